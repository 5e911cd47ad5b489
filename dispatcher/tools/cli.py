"""``python -m dispatcher``: serve, apply a fleet file, submit, inspect and steer runs.

The parser and the entry point; each command is a coroutine of :mod:`dispatcher.tools.commands`
(and :mod:`dispatcher.tools.cli_connections` for sign-in connections).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from dispatcher import __version__
from dispatcher.errors import ConfigurationError, DispatchError, Unavailable
from dispatcher.logs import scrub
from dispatcher.settings import Settings
from dispatcher.tools import principals
from dispatcher.tools.commands import (
    cmd_apply,
    cmd_cancel,
    cmd_machines_list,
    cmd_maintenance,
    cmd_queue_priority,
    cmd_queue_show,
    cmd_queue_top,
    cmd_redrive,
    cmd_runs_show,
    cmd_runs_wait,
    cmd_serve,
    cmd_submit,
)
from dispatcher.tools.ops_commands import (
    cmd_contract,
    cmd_definitions,
    cmd_doctor,
    cmd_queues_migrate,
    cmd_secrets_rotate,
)

Handler = Callable[[argparse.Namespace, Settings], Awaitable[int]]


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
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="show what would change (+ added, ~ changed, - removed), change nothing",
    )
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
    p.add_argument(
        "--fail-early",
        action="store_true",
        help="end the run at once (PredictedQueueTimeout) if it certainly misses its deadline",
    )
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
    principals.register(machines, sub, add)

    p = add("redrive", cmd_redrive, "re-submit runs that ended with a status in a time window")
    p.add_argument(
        "--status", default="timed_out", choices=["timed_out", "failed", "cancelled", "rejected"]
    )
    p.add_argument("--since", required=True, help="ISO time, epoch seconds, or -2h / -30m")
    p.add_argument("--until", default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--json", action="store_true")

    secrets = add(
        "secrets", cmd_secrets_rotate, "secrets at rest: re-encrypt with the current key"
    ).add_subparsers(dest="secrets_command", required=True)
    p = add(
        "rotate",
        cmd_secrets_rotate,
        "re-encrypt stored passwords and token caches with the first key of "
        "RUNDISPATCH_SECRET_KEYS (the others must still be listed to open them)",
        secrets,
    )
    p.add_argument("--dry-run", action="store_true", help="only count what would be re-sealed")
    p.add_argument("--json", action="store_true")

    p = add(
        "definitions",
        cmd_definitions,
        "RabbitMQ definitions of the namespace (exchanges, queues, bindings, policies)",
    )
    p.add_argument("--vhost", default="/", help="the virtual host they are for (default /)")
    p.add_argument(
        "--output",
        default=None,
        help="write this file (its users and permissions are kept) instead of printing",
    )

    queues = add(
        "queues",
        cmd_queues_migrate,
        "the shared queues: declare them again after a change of their arguments",
    ).add_subparsers(dest="queues_command", required=True)
    p = add(
        "migrate",
        cmd_queues_migrate,
        "declare the requests and workers' requests queues again with this configuration's "
        "arguments (after a change of RUNDISPATCH_ACTIVE_REPLICAS), keeping their messages and "
        "who sent each; stop every dispatcher replica first (docs/operations.md, 'Replicas')",
        queues,
    )
    p.add_argument("--dry-run", action="store_true", help="only say which queues differ")
    p.add_argument("--json", action="store_true")

    p = add(
        "contract",
        cmd_contract,
        "write the JSON Schemas and the AsyncAPI document of the AMQP contract",
    )
    p.add_argument("--output", default="docs/contract", help="directory (default docs/contract)")

    p = add("doctor", cmd_doctor, "check Redis, RabbitMQ, the topology, clocks; say what to fix")
    p.add_argument("--json", action="store_true")

    from dispatcher.tools import cli_foresight

    cli_foresight.register(sub)

    try:
        from dispatcher.tools import cli_connections
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
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
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
        if isinstance(exc, Unavailable):
            return unreachable(exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from dispatcher.bootstrap import UNREACHABLE

        if isinstance(exc, UNREACHABLE):
            return unreachable(exc)
        raise


def unreachable(exc: BaseException) -> int:
    """RabbitMQ or Redis cannot be reached: one line that says which, and exit code 3."""
    print(f"error: cannot reach RabbitMQ or Redis: {scrub(str(exc))}", file=sys.stderr)
    return 3
