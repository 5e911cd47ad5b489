"""``python -m dispatcher``: serve, apply a fleet file, submit, inspect and steer runs."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dispatcher import __version__
from dispatcher.errors import DispatchError
from dispatcher.models import Run
from dispatcher.settings import Settings

Handler = Callable[[argparse.Namespace, Settings], Awaitable[int]]


def iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_time(text: str) -> float:
    """An ISO time, epoch seconds, or a relative ``-2h`` / ``-30m`` / ``-45s``."""
    text = text.strip()
    if text.startswith("-") and text[-1] in "smhd":
        factor = {"s": 1, "m": 60, "h": 3600, "d": 86400}[text[-1]]
        return time.time() - float(text[1:-1]) * factor
    try:
        return float(text)
    except ValueError:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def print_run(run: Run, explain: dict[str, Any] | None) -> None:
    print(f"run        {run.run_id}")
    print(f"status     {run.status.value}")
    print(f"flow       {run.flow_id}   connection {run.connection_id} ({run.connection_kind})")
    print(f"mode       {run.mode.value}   priority {run.priority.value}   target {run.target}")
    print(f"machine    {run.machine_id or '-'}")
    for name in ("submitted_at", "queued_at", "dispatched_at", "started_at", "finished_at"):
        print(f"{name:<14} {iso(getattr(run, name))}")
    print(f"{'queue_deadline':<14} {iso(run.queue_deadline)}")
    if run.error:
        print(f"error      {run.error.code.value}: {run.error.message}")
        if run.error.detail:
            print(f"           {json.dumps(run.error.detail)}")
    if run.outputs:
        print(f"outputs    {json.dumps(run.outputs)}")
    if explain:
        print(f"position   {explain['position']} in {explain['target']}")
        reasons = explain.get("reasons") or {}
        if reasons:
            print("waiting because:")
            for machine_id, reason in sorted(reasons.items()):
                print(f"  {machine_id:<20} {reason}")
        else:
            print("waiting because: no placement attempt recorded yet")
    print("timeline:")
    for event in run.timeline:
        detail = f"  {json.dumps(event.detail)}" if event.detail else ""
        print(f"  {iso(event.at)}  {event.event}{detail}")


# ---- commands ---------------------------------------------------------------------------------
async def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.server import serve

    return await serve(settings, metrics_port=args.metrics_port)


async def cmd_apply(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.adapters.runtime import runtime
    from dispatcher.crypto import SecretBox
    from dispatcher.fleet import build_connections, check_references, load_fleet_file

    fleet_file = load_fleet_file(Path(args.file))
    check_references(fleet_file, settings.max_group_size)
    box: SecretBox | None = None

    def seal(password: str, connection_id: str) -> str:
        nonlocal box
        box = box or SecretBox.from_settings(settings)
        return box.seal(password.encode(), connection_id)

    connections = build_connections(fleet_file, seal, args.file)
    async with runtime(settings, amqp=not args.no_signal) as rt:
        counts = await rt.fleet.apply(
            fleet_file.environment,
            fleet_file.groups,
            fleet_file.machines,
            connections,
            prune=args.prune,
        )
        if not args.no_signal:
            for machine in fleet_file.machines:
                await rt.amqp.ensure_machine_queue(machine.machine_id)
            await rt.amqp.publish_json(
                "events", "machine.changed", b"{}", kind="machine.changed", mandatory=False
            )
    if args.json:
        print_json(counts)
    else:
        print(
            f"applied {counts['groups']} groups, {counts['machines']} machines, "
            f"{counts['connections']} connections"
            + (f"; removed {counts['removed']}" if args.prune else "")
        )
    return 0


async def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.client import Client

    inputs: dict[str, Any] = {}
    for item in args.input:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--input expects KEY=VALUE, got {item!r}")
        try:
            inputs[key] = json.loads(value)
        except ValueError:
            inputs[key] = value
    async with Client.connect(settings) as client:
        run_id = await client.submit(
            connection_id=args.connection,
            flow_id=args.flow,
            requested_by=args.requested_by,
            mode=args.mode,
            priority=args.priority,
            inputs=inputs,
            run_id=args.run_id,
            queue_timeout_s=args.queue_timeout,
            max_run_s=args.max_run,
        )
        if not args.wait:
            print_json({"run_id": run_id}) if args.json else print(run_id)
            return 0
        run = await client.wait(run_id, timeout=args.timeout)
        if args.json:
            print_json(run.model_dump(mode="json"))
        else:
            print_run(run, None)
        return 0 if run.status.value == "succeeded" else 1


async def cmd_runs_show(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.client import Client

    async with Client.connect(settings) as client:
        run = await client.get(args.run_id)
        entry = await client.explain(run)
    explain = entry.as_dict() if entry else None
    if args.json:
        data = run.model_dump(mode="json")
        data["queue"] = explain
        print_json(data)
    else:
        print_run(run, explain)
    return 0


async def cmd_runs_wait(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.client import Client

    async with Client.connect(settings) as client:
        run = await client.wait(args.run_id, timeout=args.timeout)
    print_json(run.model_dump(mode="json")) if args.json else print_run(run, None)
    return 0 if run.status.value == "succeeded" else 1


async def cmd_queue_show(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.client import Client

    async with Client.connect(settings) as client:
        entries = await client.queue(args.target, limit=args.limit)
    if args.json:
        print_json([e.as_dict() for e in entries])
        return 0
    if not entries:
        print("no queued runs" + (f" for {args.target}" if args.target else ""))
        return 0
    current = None
    for entry in entries:
        if entry.target != current:
            current = entry.target
            print(f"\n{current}")
            print(
                f"  {'pos':>4}  {'run_id':<34} {'prio':<6} {'mode':<10} {'wait':>8}  "
                f"{'deadline':<24}  reason"
            )
        reason = "; ".join(f"{m}: {r}" for m, r in sorted(entry.reasons.items())) or "-"
        print(
            f"  {entry.position:>4}  {entry.run_id:<34} {entry.priority:<6} {entry.mode:<10} "
            f"{entry.waited_s:>7.1f}s  {iso(entry.queue_deadline):<24}  {reason}"
        )
    return 0


async def cmd_queue_priority(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.client import Client

    async with Client.connect(settings) as client:
        run = await client.set_priority(args.run_id, args.priority)
        entry = await client.explain(run)
    print(
        f"{run.run_id}: priority {run.priority.value}, position {entry.position if entry else '-'}"
    )
    return 0


async def cmd_queue_top(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.client import Client

    async with Client.connect(settings) as client:
        run = await client.move_to_top(args.run_id)
        entry = await client.explain(run)
    print(f"{run.run_id}: position {entry.position if entry else '-'}")
    return 0


async def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.client import Client

    async with Client.connect(settings) as client:
        run = await client.cancel(args.run_id, args.reason)
        if args.wait and not run.status.terminal:
            run = await client.wait(args.run_id, timeout=args.timeout)
    if args.json:
        print_json(run.model_dump(mode="json"))
    elif run.status.terminal:
        print(f"{run.run_id}: {run.status.value}")
    else:
        print(
            f"{run.run_id}: {run.status.value}; the worker on {run.machine_id} was told to stop it"
        )
    return 0


async def cmd_maintenance(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.adapters.runtime import runtime

    async with runtime(settings) as rt:
        machine = await rt.fleet.set_maintenance(args.machine_id, args.state == "on")
        await rt.amqp.publish_json(
            "events",
            "machine.changed",
            json.dumps({"machine_id": machine.machine_id}).encode(),
            kind="machine.changed",
            mandatory=False,
        )
    state = "on" if machine.maintenance else "off"
    print(f"machine {machine.machine_id}: maintenance {state}")
    return 0


async def cmd_machines_list(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.adapters.runtime import runtime

    async with runtime(settings, amqp=False) as rt:
        fleet = await rt.fleet.load()
        machines = [fleet.machines[m] for m in sorted(fleet.machines)]
        views = await rt.machines.views(machines, time.time(), settings.offline_after_s)
    rows: list[dict[str, Any]] = [
        {
            "machine_id": v.machine_id,
            "group_id": v.machine.group_id,
            "online": v.online,
            "maintenance": v.machine.maintenance,
            "sessions": [s.model_dump(mode="json") for s in v.sessions],
            "runs": len(v.assigned),
            "max_unattended_runs": v.machine.max_unattended_runs,
        }
        for v in views
    ]
    if args.json:
        print_json(rows)
        return 0
    for row in rows:
        state = "maintenance" if row["maintenance"] else ("online" if row["online"] else "offline")
        sessions = ", ".join(f"{s['user']}({s['state']})" for s in row["sessions"]) or "-"
        print(
            f"{row['machine_id']:<20} {row['group_id'] or '-':<16} {state:<12} "
            f"runs {row['runs']}/{row['max_unattended_runs']}  sessions {sessions}"
        )
    return 0


async def cmd_redrive(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.redrive import redrive

    report = await redrive(
        settings,
        status=args.status,
        since=parse_time(args.since),
        until=parse_time(args.until) if args.until else time.time(),
        dry_run=args.dry_run,
    )
    if args.json:
        print_json(report)
    else:
        verb = "would re-submit" if args.dry_run else "re-submitted"
        print(f"{verb} {len(report['submitted'])} runs; skipped {len(report['skipped'])}")
        for old, new in report["submitted"]:
            print(f"  {old} -> {new}")
    return 0


# ---- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dispatcher",
        description="Run dispatcher for desktop flows. Settings come from RUNDISPATCH_* "
        "environment variables (see README).",
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, handler: Handler, help_text: str, parent: Any = sub
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = add("serve", cmd_serve, "run a dispatcher replica (consume requests, place runs)")
    p.add_argument("--metrics-port", type=int, default=None, help="port of /metrics (0 = any)")

    p = add(
        "apply", cmd_apply, "create or update groups, machines and connections from a fleet file"
    )
    p.add_argument("file", help="fleet file (YAML or JSON), see deploy/examples/fleet.yaml")
    p.add_argument("--prune", action="store_true", help="delete what the file does not list")
    p.add_argument("--no-signal", action="store_true", help="write Redis only, skip RabbitMQ")
    p.add_argument("--json", action="store_true")

    p = add("submit", cmd_submit, "submit a run request over AMQP")
    p.add_argument("--connection", required=True)
    p.add_argument("--flow", required=True)
    p.add_argument("--requested-by", required=True)
    p.add_argument("--mode", required=True, choices=["attended", "unattended"])
    p.add_argument("--priority", default="normal", choices=["high", "normal"])
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a flow input; VALUE is parsed as JSON when it can be",
    )
    p.add_argument("--run-id", default=None, help="idempotency key (default: a new id)")
    p.add_argument(
        "--queue-timeout", type=float, default=None, help="seconds; may only shorten the limit"
    )
    p.add_argument("--max-run", type=float, default=None, help="run time limit in seconds")
    p.add_argument("--wait", action="store_true", help="wait until the run is terminal, print it")
    p.add_argument(
        "--timeout", type=float, default=None, help="with --wait: give up after S seconds"
    )
    p.add_argument("--json", action="store_true")

    runs = add(
        "runs", cmd_runs_show, "a run's record, timeline and why it waits; wait for a run"
    ).add_subparsers(dest="runs_command", required=True)
    p = add("show", cmd_runs_show, "a run with its timeline, position and why it waits", runs)
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true")
    p = add("wait", cmd_runs_wait, "wait until a run is terminal", runs)
    p.add_argument("run_id")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--json", action="store_true")

    queue = add("queue", cmd_queue_show, "inspect and reorder queues").add_subparsers(
        dest="queue_command", required=True
    )
    p = add(
        "show",
        cmd_queue_show,
        "queued runs per target: position, priority, wait, deadline, reason",
        queue,
    )
    p.add_argument("--target", default=None, help="a target key: m:<machine_id> or g:<group_id>")
    p.add_argument("--limit", type=int, default=100, help="runs per target (default 100)")
    p.add_argument("--json", action="store_true")
    p = add("priority", cmd_queue_priority, "change a queued run's priority", queue)
    p.add_argument("run_id")
    p.add_argument("priority", choices=["high", "normal"])
    p = add("move-to-top", cmd_queue_top, "put a queued run first in its queue", queue)
    p.add_argument("run_id")

    p = add("cancel", cmd_cancel, "cancel a queued, dispatched or running run")
    p.add_argument("run_id")
    p.add_argument("--reason", default="cancelled by operator")
    p.add_argument("--wait", action="store_true", help="wait until a running run has stopped")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--json", action="store_true")

    machines = add(
        "machines", cmd_machines_list, "machines' live state; maintenance on/off"
    ).add_subparsers(dest="machines_command", required=True)
    p = add("list", cmd_machines_list, "machines with live state", machines)
    p.add_argument("--json", action="store_true")
    p = add(
        "maintenance",
        cmd_maintenance,
        "maintenance on: running runs finish, new ones queue",
        machines,
    )
    p.add_argument("machine_id")
    p.add_argument("state", choices=["on", "off"])

    p = add("redrive", cmd_redrive, "re-submit runs that ended with a status in a time window")
    p.add_argument(
        "--status", default="timed_out", choices=["timed_out", "failed", "cancelled", "rejected"]
    )
    p.add_argument("--since", required=True, help="ISO time, epoch seconds, or -2h / -30m")
    p.add_argument("--until", default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--json", action="store_true")

    try:
        from dispatcher import cli_connections
    except ImportError:  # pragma: no cover - the identity package is optional at build time
        pass
    else:
        cli_connections.register(sub)
    return parser


RELATIVE_TIME = re.compile(r"^-\d+(\.\d+)?[smhd]$")


def glue_relative_times(argv: list[str]) -> list[str]:
    """``--since -1h``: argparse would take ``-1h`` for an option; pass it as ``--since=-1h``."""
    glued: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        following = argv[index + 1] if index + 1 < len(argv) else ""
        if arg in ("--since", "--until") and RELATIVE_TIME.match(following):
            glued.append(f"{arg}={following}")
            index += 2
            continue
        glued.append(arg)
        index += 1
    return glued


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(glue_relative_times(sys.argv[1:] if argv is None else argv))
    try:
        settings = Settings.load()
    except ValidationError as exc:
        print(f"invalid settings: {exc}", file=sys.stderr)
        return 2
    from dispatcher.logs import configure

    configure(settings.log_level, settings.log_format)
    handler = getattr(args, "func", None) or args.handler
    try:
        result = handler(args, settings)
        if asyncio.iscoroutine(result):
            return int(asyncio.run(result))
        return int(result)
    except KeyboardInterrupt:
        return 130
    except (DispatchError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ConnectionError, OSError) as exc:
        print(f"error: cannot reach RabbitMQ or Redis: {exc}", file=sys.stderr)
        return 3
