"""Fleet files (SPEC §4): parse and validate YAML or JSON into typed models. No I/O here
beyond reading the file the caller names."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dispatcher.core.fleet import FleetSnapshot
from dispatcher.errors import ConfigurationError
from dispatcher.models import Connection, ConnectionKind, FleetFile, Group, Machine


def _describe(error: ValidationError, where: str) -> str:
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        lines.append(f"{where}{'.' if location else ''}{location}: {item['msg']}")
    return "; ".join(lines)


def load_fleet_file(path: Path) -> FleetFile:
    """Read a fleet file; raise ConfigurationError naming every bad field."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot read fleet file {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"{path} is not valid YAML/JSON: {exc}") from exc
    return parse_fleet(data, str(path))


def parse_fleet(data: Any, where: str = "fleet") -> FleetFile:
    """Validate a fleet document already decoded from YAML or JSON."""
    if not isinstance(data, dict):
        raise ConfigurationError(f"{where}: the fleet file must be a mapping")
    # YAML gives lists; the models hold tuples.
    try:
        fleet = FleetFile.model_validate_json(json.dumps(data, default=str))
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc, where)) from exc
    for kind, ids in (
        ("group", [g.group_id for g in fleet.groups]),
        ("machine", [m.machine_id for m in fleet.machines]),
        ("connection", [str(c.get("connection_id")) for c in fleet.connections]),
    ):
        duplicates = [item for item, count in Counter(ids).items() if count > 1]
        if duplicates:
            raise ConfigurationError(f"{where}: duplicate {kind} ids: {', '.join(duplicates)}")
    return fleet


def build_connections(
    fleet: FleetFile, seal_password: Callable[[str, str], str], where: str = "fleet"
) -> list[Connection]:
    """Turn connection entries into Connections; a plain ``password`` is sealed at once."""
    connections = []
    for index, original in enumerate(fleet.connections):
        entry = dict(original)
        password = entry.pop("password", None)
        if password is not None:
            if not isinstance(password, str) or not password:
                raise ConfigurationError(f"{where}.connections.{index}.password: must be text")
            if entry.get("kind") != ConnectionKind.credentials.value:
                raise ConfigurationError(
                    f"{where}.connections.{index}: only credentials connections carry a password"
                )
            entry["password_sealed"] = seal_password(password, str(entry.get("connection_id")))
        try:
            connections.append(Connection.model_validate_json(json.dumps(entry)))
        except ValidationError as exc:
            raise ConfigurationError(_describe(exc, f"{where}.connections.{index}")) from exc
    return connections


def check_references(fleet: FleetFile, max_group_size: int) -> None:
    """Machines name existing groups; groups stay within the size limit."""
    group_ids = {g.group_id for g in fleet.groups}
    sizes: Counter[str] = Counter()
    for machine in fleet.machines:
        if machine.group_id is not None:
            sizes[machine.group_id] += 1
            if machine.group_id not in group_ids:
                raise ConfigurationError(
                    f"machine {machine.machine_id!r} names unknown group {machine.group_id!r}"
                )
    for group_id, size in sizes.items():
        if size > max_group_size:
            raise ConfigurationError(
                f"group {group_id!r} has {size} machines; the limit is {max_group_size}"
            )


def keep_maintenance(machines: Sequence[Machine], current: FleetSnapshot) -> list[Machine]:
    """Machines as the file gives them, but a machine put in maintenance from the CLI stays
    in maintenance unless the file sets ``maintenance`` itself."""
    kept = []
    for given in machines:
        now = current.machines.get(given.machine_id)
        held = "maintenance" not in given.model_fields_set and now is not None and now.maintenance
        kept.append(given.model_copy(update={"maintenance": True}) if held else given)
    return kept


# A password is sealed again (new nonce) at every apply: its seal is not a change.
_NOT_COMPARED = {"password_sealed"}


def _fields(item: BaseModel) -> dict[str, Any]:
    data: dict[str, Any] = item.model_dump(mode="json", exclude=_NOT_COMPARED)
    return data


def fleet_diff(
    current: FleetSnapshot,
    groups: Sequence[Group],
    machines: Sequence[Machine],
    connections: Sequence[Connection],
    prune: bool,
) -> list[str]:
    """What applying would change, one line each: ``+ kind id``, ``~ kind id: field a -> b``,
    ``- kind id`` (with ``prune``). Empty when nothing would change."""
    lines: list[str] = []
    sections: list[tuple[str, dict[str, Any], Sequence[Any], str]] = [
        ("group", current.groups, groups, "group_id"),
        ("machine", current.machines, machines, "machine_id"),
        ("connection", current.connections, connections, "connection_id"),
    ]
    for kind, have, want, key in sections:
        wanted = {getattr(item, key): item for item in want}
        for item_id, item in wanted.items():
            old = have.get(item_id)
            if old is None:
                lines.append(f"+ {kind} {item_id}")
                continue
            before, after = _fields(old), _fields(item)
            for name in sorted(set(before) | set(after)):
                if before.get(name) != after.get(name):
                    lines.append(
                        f"~ {kind} {item_id}: {name} "
                        f"{json.dumps(before.get(name))} -> {json.dumps(after.get(name))}"
                    )
        if prune:
            lines.extend(f"- {kind} {item_id}" for item_id in sorted(set(have) - set(wanted)))
    return lines
