"""The live fleet's machines and its fleet file (``bench/livefleet.py``): the serving
machines that the measured runs target, the others, their groups and connections."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.env import REPO
from bench.fleet import OWNER, fleet_document

SERVE_GROUP = "fleet00"
SERVE_SLOTS = 10
FLEET_CONNECTIONS = tuple(f"c-fleet-{i}" for i in range(SERVE_SLOTS))


def serving_ids(count: int) -> list[str]:
    return [f"fs-{i:03d}" for i in range(count)]


def other_ids(count: int) -> list[str]:
    return [f"fm-{i:05d}" for i in range(count)]


def live_fleet_document(
    live: Sequence[str], small: int, size: int, serving: int, groups: int
) -> dict[str, Any]:
    """The live fleet, applied beside the bench's own (no pruning): ``serving`` machines in
    ``fleet00``, the other ``size - serving`` spread over ``groups - 1`` groups."""
    document: dict[str, Any] = {
        "environment": fleet_document(live, small)["environment"],
        "groups": [],
        "machines": [],
        "connections": [],
    }
    others = other_ids(size - serving)
    per_group = -(-len(others) // max(1, groups - 1))
    document["groups"] += [
        {"group_id": f"fleet{g:02d}", "name": f"fleet{g:02d}"} for g in range(groups)
    ]
    document["machines"] += [
        {
            "machine_id": machine_id,
            "name": machine_id,
            "group_id": SERVE_GROUP,
            "os": "windows_server",
            "max_unattended_runs": SERVE_SLOTS,
        }
        for machine_id in serving_ids(serving)
    ]
    document["machines"] += [
        {"machine_id": m, "name": m, "group_id": f"fleet{1 + i // per_group:02d}"}
        for i, m in enumerate(others)
    ]
    document["connections"] += [
        {
            "connection_id": connection_id,
            "owner": OWNER,
            "kind": "credentials",
            "target": {"group_id": SERVE_GROUP},
            "username": f"CONTOSO\\svc-fleet-{index}",
            "password": "bench-password",
        }
        for index, connection_id in enumerate(FLEET_CONNECTIONS)
    ]
    return document


def apply_document(path: Path, env: dict[str, str]) -> None:
    """``dispatcher apply --no-signal`` of a fleet file (the machines' queues are declared by
    the dispatcher at each machine's first heartbeat)."""
    argv = [sys.executable, "-m", "dispatcher", "apply", str(path), "--no-signal"]
    done = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"apply failed: {done.stderr or done.stdout}")
