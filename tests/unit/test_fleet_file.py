"""Fleet files: the shipped example is valid, and bad files say exactly what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dispatcher.crypto import SecretBox
from dispatcher.errors import ConfigurationError
from dispatcher.tools.fleet_file import (
    build_connections,
    check_references,
    load_fleet_file,
    parse_fleet,
)

pytestmark = pytest.mark.unit
EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "fleet.yaml"


def test_example_fleet_is_valid_and_seals_passwords() -> None:
    fleet = load_fleet_file(EXAMPLE)
    check_references(fleet, max_group_size=50)
    box = SecretBox.parse(f"k1:{SecretBox.generate_key()}")
    connections = build_connections(fleet, lambda pw, cid: box.seal(pw.encode(), cid))
    stored = {c.connection_id: c for c in connections}
    assert set(stored) == {"c1", "c2", "c3", "s1"}
    sealed = stored["c1"].password_sealed
    assert sealed and "change-me" not in sealed
    assert box.open(sealed, "c1") == b"change-me"
    assert "change-me" not in json.dumps([c.model_dump(mode="json") for c in connections])
    assert [(s.name, s.acts_for) for s in fleet.submitters] == [
        ("finance-flows", ("alice@contoso.com", "carol@contoso.com"))
    ]


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "must be a mapping"),
        ({"environment": {"tenant_id": "nope"}}, "environment.tenant_id"),
        (
            {
                "environment": {"tenant_id": "11111111-2222-3333-4444-555555555555"},
                "machines": [{"machine_id": "m1", "name": "a", "max_unattended_runs": 11}],
            },
            "machines.0.max_unattended_runs",
        ),
        (
            {
                "environment": {"tenant_id": "11111111-2222-3333-4444-555555555555"},
                "groups": [{"group_id": "g", "name": "G"}, {"group_id": "g", "name": "H"}],
            },
            "duplicate group ids: g",
        ),
        (
            {
                "environment": {"tenant_id": "11111111-2222-3333-4444-555555555555"},
                "submitters": [{"name": "a.b", "acts_for": ["alice@contoso.com"]}],
            },
            "submitters.0.name",
        ),
        (
            {
                "environment": {"tenant_id": "11111111-2222-3333-4444-555555555555"},
                "submitters": [{"name": "env1", "acts_for": []}],
            },
            "submitters.0.acts_for",
        ),
    ],
)
def test_bad_fleet_files_name_the_problem(document: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_fleet(document)


def test_password_only_on_credentials_connections() -> None:
    fleet = parse_fleet(
        {
            "environment": {"tenant_id": "11111111-2222-3333-4444-555555555555"},
            "connections": [
                {
                    "connection_id": "s1",
                    "owner": "bob@contoso.com",
                    "kind": "sign_in",
                    "target": {"machine_id": "m2"},
                    "account": "bob@contoso.com",
                    "tenant_id": "11111111-2222-3333-4444-555555555555",
                    "password": "x",
                }
            ],
        }
    )
    with pytest.raises(ConfigurationError, match="only credentials connections"):
        build_connections(fleet, lambda pw, cid: pw)


def test_group_size_limit() -> None:
    fleet = parse_fleet(
        {
            "environment": {"tenant_id": "11111111-2222-3333-4444-555555555555"},
            "groups": [{"group_id": "g", "name": "G"}],
            "machines": [
                {"machine_id": f"m{i}", "name": f"M{i}", "group_id": "g"} for i in range(3)
            ],
        }
    )
    with pytest.raises(ConfigurationError, match="limit is 2"):
        check_references(fleet, max_group_size=2)
