"""RabbitMQ's files for queues: how many its nodes may hold, how many the queues need
(``doctor``, and the benchmark before it declares thousands of machines).

RabbitMQ 3.10 counts the files of its queues against one budget per node, its open-file limit
less about a hundred (measured here: 927 of 1,024, 19,903 of 20,000). A quorum queue holds 3
from its declaration on; a classic queue holds 1 once it has stored a persistent message, and
keeps it (``python -m bench.filehandles`` measures both). At the budget, a queue that needs a
file waits for another to give one back, which may never happen: the node stops confirming
publishes and answering queue deletions, and raises no alarm. On a default Debian install
(1,024 files) that is ~300 machines with quorum machine queues (bench/README.md, "RabbitMQ's
file handles").
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from dispatcher.adapters.amqp.identities import checked, management_client
from dispatcher.errors import BrokerUnavailable

QUORUM_QUEUE_FILES = 3
CLASSIC_QUEUE_FILES = 1
# What RabbitMQ keeps out of the queues' budget (the open-file limit less the budget above).
RESERVED_FILES = 97


def files_per_machine(machine_queue_type: str, cluster: bool = False) -> int:
    """Files a machine's two queues hold: its assignments queue (``machine_queue_type``) and
    its replies queue (classic and transient on one node, so none; quorum on a cluster)."""
    assignments = QUORUM_QUEUE_FILES if machine_queue_type == "quorum" else CLASSIC_QUEUE_FILES
    return assignments + (QUORUM_QUEUE_FILES if cluster else 0)


@dataclass(frozen=True, slots=True)
class NodeFiles:
    """The smallest open-file limit of the cluster's nodes and the queues counted against it
    (every virtual host's: they share the nodes)."""

    open_file_limit: int
    quorum_queues: int
    classic_queues: int

    @property
    def budget(self) -> int:
        return max(self.open_file_limit - RESERVED_FILES, 0)

    @property
    def needed(self) -> int:
        """At most what the queues hold (a classic queue counted as if it had stored one)."""
        return QUORUM_QUEUE_FILES * self.quorum_queues + CLASSIC_QUEUE_FILES * self.classic_queues

    def room_for(self, per_machine: int) -> int:
        """How many more machines the budget holds at ``per_machine`` files each."""
        return max(self.budget - self.needed, 0) // max(per_machine, 1)


async def read_node_files(admin_url: str, timeout_s: float = 10.0) -> NodeFiles:
    """The nodes' open-file limit and the queues by type, from the management API.

    ``BrokerUnavailable`` when the API cannot be reached, ``ConfigurationError`` when it
    refuses the credentials of ``admin_url``."""
    try:
        async with management_client(admin_url, timeout_s) as client:
            nodes = await client.get("/api/nodes", params={"columns": "name,fd_total"})
            queues = await client.get("/api/queues", params={"columns": "type"})
    except httpx.HTTPError as exc:
        raise BrokerUnavailable(
            f"the RabbitMQ management API cannot be reached ({type(exc).__name__})"
        ) from None
    limits = [int(node["fd_total"]) for node in checked(nodes).json() if node.get("fd_total")]
    types = [queue.get("type") for queue in checked(queues).json()]
    return NodeFiles(
        open_file_limit=min(limits) if limits else 0,
        quorum_queues=sum(kind == "quorum" for kind in types),
        classic_queues=sum(kind == "classic" for kind in types),
    )
