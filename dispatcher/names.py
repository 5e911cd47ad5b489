"""Every AMQP name and Redis key, built under the configurable namespace.

Nothing else in the code base spells a key or a queue name: change the layout here.
"""

from __future__ import annotations

from dataclasses import dataclass

# Routing keys of the events that end a run: the signals queue binds them (a finished run
# frees room on its machine), and the replica consuming one counts the run's final status.
TERMINAL_EVENT_KEYS = ("run.succeeded", "run.failed", "run.cancelled", "run.timed_out")


@dataclass(frozen=True, slots=True)
class Names:
    """AMQP names (dot separated) and Redis keys (colon separated) for one namespace."""

    ns: str

    # ---- AMQP -------------------------------------------------------------------------------
    @property
    def requests_exchange(self) -> str:
        """Direct exchange cloud flows publish run requests to (routing key ``submit``)."""
        return f"{self.ns}.requests"

    @property
    def requests_queue(self) -> str:
        """Quorum queue the dispatchers consume run requests (and cancels) from."""
        return f"{self.ns}.requests"

    @property
    def events_exchange(self) -> str:
        """Topic exchange every status change is published to as ``run.<status>``."""
        return f"{self.ns}.events"

    @property
    def dead_exchange(self) -> str:
        """Fanout exchange feeding the dead-letter queue."""
        return f"{self.ns}.dead"

    @property
    def dead_queue(self) -> str:
        return f"{self.ns}.dead"

    @property
    def machines_exchange(self) -> str:
        """Direct exchange carrying assignments and cancels to machine queues (key = machine id)."""
        return f"{self.ns}.machines"

    def machine_queue(self, machine_id: str) -> str:
        return f"{self.ns}.machine.{machine_id}"

    @property
    def heartbeats_exchange(self) -> str:
        return f"{self.ns}.heartbeats"

    @property
    def heartbeats_queue(self) -> str:
        return f"{self.ns}.heartbeats"

    @property
    def signals_queue(self) -> str:
        """Queue bound to the terminal run events: a finished run frees a slot somewhere."""
        return f"{self.ns}.signals"

    # ---- Redis: fleet -------------------------------------------------------------------------
    @property
    def environment(self) -> str:
        return f"{self.ns}:env"

    @property
    def fleet_version(self) -> str:
        """Counter bumped by every fleet change; processes cache the fleet until it moves."""
        return f"{self.ns}:fleet:version"

    @property
    def groups(self) -> str:
        """Hash group_id -> group JSON."""
        return f"{self.ns}:groups"

    @property
    def machines(self) -> str:
        """Hash machine_id -> machine JSON (configuration)."""
        return f"{self.ns}:machines"

    @property
    def connections(self) -> str:
        """Hash connection_id -> connection JSON (secrets encrypted)."""
        return f"{self.ns}:connections"

    def machine_live(self, machine_id: str) -> str:
        """String: the machine's last heartbeat (JSON)."""
        return f"{self.ns}:live:{machine_id}"

    def machine_assigned(self, machine_id: str) -> str:
        """Hash run_id -> ``mode|fence|user`` of runs dispatched to or running on the machine
        (user case-folded; written by claim.lua, encoded in ``adapters/redis/codec.py``)."""
        return f"{self.ns}:assigned:{machine_id}"

    @property
    def heartbeat_index(self) -> str:
        """Sorted set machine_id -> time of its last heartbeat."""
        return f"{self.ns}:heartbeats"

    @property
    def offline_machines(self) -> str:
        """Hash machine_id -> time it was declared offline."""
        return f"{self.ns}:offline"

    # ---- Redis: runs and queues -------------------------------------------------------------
    def run(self, run_id: str) -> str:
        """Hash: the run record, one JSON fragment per field."""
        return f"{self.ns}:run:{run_id}"

    def queue(self, target: str) -> str:
        """Sorted set run_id -> order score: the target's queue, in dispatch order."""
        return f"{self.ns}:q:{target}"

    def lane(self, target: str, lane: str) -> str:
        """Sorted set of the runs of one target that share eligibility (same connection+mode)."""
        return f"{self.ns}:lane:{target}:{lane}"

    def lanes(self, target: str) -> str:
        """Sorted set lane -> score of its head run."""
        return f"{self.ns}:lanes:{target}"

    def reasons(self, target: str) -> str:
        """Hash lane -> why its head run cannot be placed (JSON, per machine)."""
        return f"{self.ns}:reasons:{target}"

    @property
    def targets(self) -> str:
        """Set of targets that have queued runs."""
        return f"{self.ns}:targets"

    @property
    def queue_deadlines(self) -> str:
        """Sorted set run_id -> queue deadline (epoch seconds)."""
        return f"{self.ns}:deadlines"

    @property
    def running_deadlines(self) -> str:
        """Sorted set run_id -> time after which a running run is failed by the dispatcher."""
        return f"{self.ns}:running"

    def finished(self, status: str) -> str:
        """Sorted set run_id -> finished_at, per terminal status (for re-drive)."""
        return f"{self.ns}:finished:{status}"

    def throttle(self, connection_id: str, window: int) -> str:
        return f"{self.ns}:throttle:{connection_id}:{window}"

    @property
    def fence(self) -> str:
        """Counter issuing fencing tokens for hand-offs."""
        return f"{self.ns}:fence"

    @property
    def outbox(self) -> str:
        """Stream of messages recorded with a state change and not yet confirmed by RabbitMQ."""
        return f"{self.ns}:outbox"

    def trace(self, target: str) -> str:
        """Stream of the target's trace records (``core.trace``), one per run that left, within
        the trace retention."""
        return f"{self.ns}:trace:{target}"

    @property
    def machine_changes(self) -> str:
        """Stream of machine changes (``core.trace.MachineChange``) for the capacity replay."""
        return f"{self.ns}:machinechanges"

    @property
    def traced(self) -> str:
        """Set of the targets that have a trace stream."""
        return f"{self.ns}:traced"

    @property
    def outlook(self) -> str:
        """Hash target -> JSON of the last forecast: earliest queue deadline, predicted misses."""
        return f"{self.ns}:outlook"

    @property
    def outbox_poison(self) -> str:
        """Stream (capped) of outbox entries that could not be published on their own: set
        aside, with the error, so that one entry never wedges the relay."""
        return f"{self.ns}:outbox:poison"

    def lease(self, role: str) -> str:
        """String lease held by the replica that performs a singleton chore (``role``)."""
        return f"{self.ns}:lease:{role}"

    # ---- Redis: identity ------------------------------------------------------------------------
    def token_cache(self, connection_id: str) -> str:
        """String: the connection's msal token cache, encrypted."""
        return f"{self.ns}:tokens:{connection_id}"

    def token_state(self, connection_id: str) -> str:
        """Hash: expiry, last refresh, error marker of a sign-in connection (no token)."""
        return f"{self.ns}:tokenstate:{connection_id}"

    def token_lock(self, connection_id: str) -> str:
        return f"{self.ns}:tokenlock:{connection_id}"

    def pattern(self) -> str:
        """Glob matching every Redis key of the namespace (for clean-up)."""
        return f"{self.ns}:*"
