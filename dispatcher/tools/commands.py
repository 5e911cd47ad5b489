"""The commands of ``python -m dispatcher`` (the parser is in :mod:`dispatcher.tools.cli`)."""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dispatcher.models import Run
from dispatcher.settings import Settings


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
        print(f"forecast   {explain['forecast']}")
        for machine_id, code in sorted((explain.get("no_machine_reasons") or {}).items()):
            print(f"  {machine_id:<20} {code}")
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
    from dispatcher.bootstrap import serve

    return await serve(settings, metrics_port=args.metrics_port)


async def cmd_apply(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.bootstrap import runtime
    from dispatcher.crypto import SecretBox
    from dispatcher.tools.fleet_file import (
        build_connections,
        check_references,
        fleet_diff,
        keep_maintenance,
        load_fleet_file,
    )

    fleet_file = load_fleet_file(Path(args.file))
    check_references(fleet_file, settings.max_group_size)
    box: SecretBox | None = None

    def seal(password: str, connection_id: str) -> str:
        nonlocal box
        box = box or SecretBox.from_settings(settings)
        return box.seal(password.encode(), connection_id)

    connections = build_connections(fleet_file, seal, args.file)
    async with runtime(settings, amqp=not (args.no_signal or args.dry_run)) as rt:
        current = await rt.fleet.load(force=True)
        machines = keep_maintenance(fleet_file.machines, current)
        if args.dry_run:
            changes = fleet_diff(
                current, fleet_file.groups, machines, connections, prune=args.prune
            )
            if args.json:
                print_json({"changes": changes})
            else:
                print("\n".join(changes) if changes else "no changes")
            return 0
        counts = await rt.fleet.apply(
            fleet_file.environment,
            fleet_file.groups,
            machines,
            connections,
            prune=args.prune,
            submitters=fleet_file.submitters,
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
    from dispatcher.tools.client import Client

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
            fail_early=args.fail_early,
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
    from dispatcher.tools.client import Client

    async with Client.connect(settings) as client:
        run = await client.get(args.run_id)
        entry = await client.explain(run)
    explain = entry.as_dict() if entry else None
    if entry is not None and explain is not None:
        explain["forecast"] = entry.forecast_text
    if args.json:
        data = run.model_dump(mode="json")
        data["queue"] = explain
        data["predicted_start_at"] = explain["predicted_start_at"] if explain else None
        data["confidence"] = explain["confidence"] if explain else None
        data["outlook"] = explain["outlook"] if explain else None
        print_json(data)
    else:
        print_run(run, explain)
    return 0


async def cmd_runs_wait(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.tools.client import Client

    async with Client.connect(settings) as client:
        run = await client.wait(args.run_id, timeout=args.timeout)
    print_json(run.model_dump(mode="json")) if args.json else print_run(run, None)
    return 0 if run.status.value == "succeeded" else 1


async def cmd_queue_show(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.tools.client import Client

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
                f"{'deadline':<24}  {'forecast':<44}  reason"
            )
        reason = "; ".join(f"{m}: {r}" for m, r in sorted(entry.reasons.items())) or "-"
        print(
            f"  {entry.position:>4}  {entry.run_id:<34} {entry.priority:<6} {entry.mode:<10} "
            f"{entry.waited_s:>7.1f}s  {iso(entry.queue_deadline):<24}  "
            f"{entry.forecast_text:<44}  {reason}"
        )
    return 0


async def cmd_queue_priority(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.tools.client import Client

    async with Client.connect(settings) as client:
        run = await client.set_priority(args.run_id, args.priority)
        entry = await client.explain(run)
    print(
        f"{run.run_id}: priority {run.priority.value}, position {entry.position if entry else '-'}"
    )
    return 0


async def cmd_queue_top(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.tools.client import Client

    async with Client.connect(settings) as client:
        run = await client.move_to_top(args.run_id)
        entry = await client.explain(run)
    print(f"{run.run_id}: position {entry.position if entry else '-'}")
    return 0


async def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.tools.client import Client

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
    from dispatcher.bootstrap import runtime

    async with runtime(settings) as rt:
        machine = await rt.fleet.set_maintenance(args.machine_id, args.state == "on")
        await rt.foresight().machine_changed(machine.machine_id, time.time())
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
    from dispatcher.bootstrap import runtime

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
            "key_mismatch": v.key_mismatch,
        }
        for v in views
    ]
    if args.json:
        print_json(rows)
        return 0
    for row in rows:
        state = "maintenance" if row["maintenance"] else ("online" if row["online"] else "offline")
        state = "KeyMismatch" if row["key_mismatch"] else state
        sessions = ", ".join(f"{s['user']}({s['state']})" for s in row["sessions"]) or "-"
        print(
            f"{row['machine_id']:<20} {row['group_id'] or '-':<16} {state:<12} "
            f"runs {row['runs']}/{row['max_unattended_runs']}  sessions {sessions}"
        )
    return 0


async def cmd_redrive(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.tools.client import Client
    from dispatcher.usecases.redrive import redrive

    async with Client.connect(settings) as client:
        report = await redrive(
            client.rt.runs,
            client,
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
