"""An immutable snapshot of the fleet: environment, groups, machines, connections."""

from __future__ import annotations

from dataclasses import dataclass, field

from dispatcher.models import Connection, Environment, Group, Machine, Target


@dataclass(frozen=True)
class FleetSnapshot:
    """The fleet configuration at one version, with the indexes decisions need."""

    environment: Environment | None
    groups: dict[str, Group]
    machines: dict[str, Machine]
    connections: dict[str, Connection]
    version: int = 0
    members: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Registered submitters -> the owners (case-folded) each may act for.
    submitters: dict[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        environment: Environment | None,
        groups: dict[str, Group],
        machines: dict[str, Machine],
        connections: dict[str, Connection],
        version: int = 0,
        *,
        submitters: dict[str, frozenset[str]] | None = None,
    ) -> FleetSnapshot:
        members: dict[str, list[str]] = {group_id: [] for group_id in groups}
        for machine in machines.values():
            if machine.group_id is not None:
                members.setdefault(machine.group_id, []).append(machine.machine_id)
        return cls(
            environment=environment,
            groups=groups,
            machines=machines,
            connections=connections,
            version=version,
            members={group_id: tuple(sorted(ids)) for group_id, ids in members.items()},
            submitters=dict(submitters or {}),
        )

    def target_exists(self, target: Target) -> bool:
        if target.machine_id is not None:
            return target.machine_id in self.machines
        return target.group_id in self.groups

    def machine_ids_of(self, target: Target) -> tuple[str, ...]:
        """The machines a run for ``target`` may go to."""
        if target.machine_id is not None:
            return (target.machine_id,) if target.machine_id in self.machines else ()
        return self.members.get(target.group_id or "", ())

    def machine_ids_of_key(self, target_key: str) -> tuple[str, ...]:
        kind, _, target_id = target_key.partition(":")
        if kind == "m":
            return self.machine_ids_of(Target(machine_id=target_id))
        return self.machine_ids_of(Target(group_id=target_id))

    def targets_of_machine(self, machine_id: str) -> tuple[str, ...]:
        """The queue keys a machine serves: its own, and its group's."""
        machine = self.machines.get(machine_id)
        if machine is None:
            return ()
        keys = [f"m:{machine_id}"]
        if machine.group_id is not None:
            keys.append(f"g:{machine.group_id}")
        return tuple(keys)
