"""Every AMQP name and Redis key, built under the configurable namespace.

Nothing else in the code base spells a key or a queue name: change the layout here.
"""

from __future__ import annotations

from dataclasses import dataclass

# Routing keys of the events that end a run: the signals queue binds them (a finished run
# frees room on its machine), and the replica consuming one counts the run's final status.
TERMINAL_EVENT_KEYS = ("run.succeeded", "run.failed", "run.cancelled", "run.timed_out")
# An event's routing key is ``run.<status>.<submitter>``: the registered submitter that sent the
# request, or NO_SUBMITTER for runs the dispatcher's own identity submitted (the CLI, the
# client). A submitter's topic permission lets it bind only keys that name it.
NO_SUBMITTER = "-"


def event_of(routing_key: str) -> str:
    """``run.<status>`` of an event's routing key (whoever submitted the run)."""
    return ".".join(routing_key.split(".")[:2])


def event_binding(event: str, submitter: str | None = None) -> str:
    """The binding key of ``run.<status>`` (``run.*`` for every status) for one submitter's
    runs, or for every run when ``submitter`` is None."""
    return f"{event}.{submitter}" if submitter is not None else f"{event}.#"


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
        """Topic exchange every status change is published to as ``run.<status>.<submitter>``."""
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

    def machine_replies_queue(self, machine_id: str) -> str:
        """A machine's answers from the dispatcher (fenced starts, reports, queries)."""
        return f"{self.ns}.machine.{machine_id}.replies"

    def machine_lease_queue(self, machine_id: str) -> str:
        """A machine's lease: an exclusive queue its one live worker declares (RabbitMQ refuses
        it to a second connection and deletes it when the holder's connection closes)."""
        return f"{self.ns}.machine.{machine_id}.lease"

    def replies_key(self, machine_id: str) -> str:
        """Routing key of a machine's replies on the machines exchange."""
        return f"{machine_id}.replies"

    @property
    def reports_exchange(self) -> str:
        """Direct exchange workers send fenced starts, outcomes and queries to (key ``report``)."""
        return f"{self.ns}.reports"

    @property
    def reports_queue(self) -> str:
        """Quorum queue the dispatchers consume workers' reports from."""
        return f"{self.ns}.reports"

    def holding_queue(self, queue: str) -> str:
        """Where ``queues migrate`` keeps a shared queue's messages while it declares the queue
        again (adapters/amqp/migrate.py)."""
        return f"{queue}.moving"

    @property
    def heartbeats_exchange(self) -> str:
        return f"{self.ns}.heartbeats"

    @property
    def heartbeats_queue(self) -> str:
        return f"{self.ns}.heartbeats"

    # ---- broker identities ------------------------------------------------------------------
    def machine_user(self, machine_id: str) -> str:
        """The RabbitMQ user of a registered machine (``machines register``)."""
        return f"{self.ns}.machine.{machine_id}"

    def submitter_user(self, submitter: str) -> str:
        """The RabbitMQ user of a registered submitter (``submitters register``)."""
        return f"{self.ns}.submitter.{submitter}"

    def submitter_queue_prefix(self, submitter: str) -> str:
        """A submitter may declare and read only queues named with this prefix."""
        return f"{self.ns}.submitter.{submitter}."

    def operator_user(self, operator: str) -> str:
        """The RabbitMQ user of a registered operator (``operators register``)."""
        return f"{self.ns}.operator.{operator}"

    @property
    def migration_user(self) -> str:
        """The temporary RabbitMQ user ``queues migrate`` moves messages as (deleted after)."""
        return f"{self.ns}.queue-migration"

    def operator_queue_prefix(self, operator: str) -> str:
        """An operator may declare and read only queues named with this prefix."""
        return f"{self.ns}.operator.{operator}."

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
    def pinned_keys(self) -> str:
        """Hash machine_id -> the worker public key pinned at its first heartbeat since it was
        registered (``machines register`` drops it)."""
        return f"{self.ns}:pinned"

    @property
    def key_mismatches(self) -> str:
        """Hash machine_id -> when a heartbeat last presented another key than the pinned one."""
        return f"{self.ns}:keymismatch"

    @property
    def submitters(self) -> str:
        """Hash submitter -> JSON list of the owners it may act for."""
        return f"{self.ns}:submitters"

    @property
    def offline_machines(self) -> str:
        """Hash machine_id -> time it was declared offline."""
        return f"{self.ns}:offline"

    @property
    def store_server(self) -> str:
        """Hash ``server`` (the run id of the Redis server last seen) and ``since`` (when a
        dispatcher first saw that server, 0 for the first one): a new server means a restart
        or a failover, after which placement waits for the machines' reports."""
        return f"{self.ns}:storeserver"

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
