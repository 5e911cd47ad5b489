"""The demo's example fleet, its machines' sessions and the submitter that acts for its
owners (``devtools.demo``)."""

from __future__ import annotations

from typing import Any

TENANT = "11111111-2222-3333-4444-555555555555"
MACHINES = ["fin-01", "fin-02", "fin-03", "desk-07"]
# The cloud-flow environment the workload comes from: a registered submitter that may run
# the connections of these owners (a request for anyone else's is rejected).
SUBMITTER = "demo-portal"
OWNERS = ["alice@contoso.com", "bob@contoso.com", "carol@contoso.com"]


def sessions(carol: str) -> dict[str, list[dict[str, str]]]:
    """The signed-in sessions of each machine; ``carol``: the state of carol's on desk-07."""
    return {
        "fin-01": [],
        "fin-02": [],
        "fin-03": [],
        "desk-07": [
            {"user": "bob@contoso.com", "state": "active"},
            {"user": "CONTOSO\\carol", "state": carol},
        ],
    }


def fleet(tenant: str) -> dict[str, Any]:
    group = "finance"
    return {
        "environment": {"tenant_id": tenant},
        "groups": [{"group_id": group, "name": "Finance bots"}],
        "machines": [
            {
                "machine_id": "fin-01",
                "name": "FIN-01",
                "group_id": group,
                "os": "windows_server",
                "join_type": "entra_joined",
                "max_unattended_runs": 3,
            },
            {
                "machine_id": "fin-02",
                "name": "FIN-02",
                "group_id": group,
                "os": "windows_server",
                "join_type": "hybrid_joined",
                "max_unattended_runs": 3,
            },
            {
                "machine_id": "fin-03",
                "name": "FIN-03",
                "group_id": group,
                "os": "windows_client",
                "join_type": "entra_joined",
            },
            {
                "machine_id": "desk-07",
                "name": "DESK-07",
                "os": "windows_client",
                "join_type": "ad_joined",
                "allowed_registration_tenants": [tenant],
            },
        ],
        "connections": [
            *(
                {
                    "connection_id": f"fin-svc-{i}",
                    "owner": "alice@contoso.com",
                    "kind": "credentials",
                    "target": {"group_id": group},
                    "username": f"CONTOSO\\svc-fin{i}",
                    "password": f"demo-password-{i}",
                }
                for i in range(1, 5)
            ),
            {
                "connection_id": "carol-desk",
                "owner": "carol@contoso.com",
                "kind": "credentials",
                "target": {"machine_id": "desk-07"},
                "username": "CONTOSO\\carol",
                "password": "demo-password-carol",
            },
            {
                "connection_id": "bob-signin",
                "owner": "bob@contoso.com",
                "kind": "sign_in",
                "target": {"machine_id": "desk-07"},
                "account": "bob@contoso.com",
                "tenant_id": tenant,
            },
        ],
    }
