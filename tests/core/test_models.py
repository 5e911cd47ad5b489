"""Run request validation and the domain models' own rules (SPEC §2, §3 InvalidRunRequest)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from dispatcher.models import (
    MAX_INPUT_DEPTH,
    Connection,
    ConnectionKind,
    Machine,
    Mode,
    Priority,
    RunRequest,
    Target,
)
from tests.support.builders import request_payload
from tests.support.constants import TENANT

pytestmark = pytest.mark.unit

MISSING = object()


def _parse(payload: dict[str, Any]) -> RunRequest:
    return RunRequest.model_validate_json(json.dumps(payload))


def _nested(levels: int) -> dict[str, Any]:
    """``levels`` dicts inside one another around a number: a JSON value of depth levels + 1."""
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value  # type: ignore[no-any-return]


def _nested_list(levels: int) -> dict[str, Any]:
    value: Any = 1
    for _ in range(levels - 1):
        value = [value]
    return {"a": value}


# (field, value): the request with that field set to value (or removed) must be refused.
INVALID: list[Any] = [
    # wrong types
    pytest.param("run_id", 42, id="run_id-int"),
    pytest.param("run_id", None, id="run_id-null"),
    pytest.param("flow_id", ["f"], id="flow_id-list"),
    pytest.param("connection_id", {"id": "c1"}, id="connection_id-object"),
    pytest.param("requested_by", 7, id="requested_by-int"),
    pytest.param("mode", 1, id="mode-int"),
    pytest.param("priority", None, id="priority-null"),
    pytest.param("inputs", [1, 2], id="inputs-list"),
    pytest.param("inputs", "a=1", id="inputs-string"),
    pytest.param("inputs", None, id="inputs-null"),
    pytest.param("queue_timeout_s", "600", id="queue_timeout-string"),
    pytest.param("queue_timeout_s", True, id="queue_timeout-bool"),
    pytest.param("max_run_s", "1h", id="max_run-string"),
    pytest.param("max_run_s", False, id="max_run-bool"),
    pytest.param("submitted_at", "yesterday", id="submitted_at-not-a-time"),
    pytest.param("submitted_at", [2024], id="submitted_at-list"),
    # numbers out of range; NaN and Infinity are not JSON at all
    pytest.param("queue_timeout_s", 0, id="queue_timeout-zero"),
    pytest.param("queue_timeout_s", -5, id="queue_timeout-negative"),
    pytest.param("max_run_s", 0.0, id="max_run-zero"),
    pytest.param("max_run_s", float("inf"), id="max_run-infinity"),
    pytest.param("max_run_s", float("nan"), id="max_run-nan"),
    pytest.param("queue_timeout_s", float("inf"), id="queue_timeout-infinity"),
    pytest.param("inputs", {"x": float("nan")}, id="inputs-nan"),
    pytest.param("inputs", {"x": [1, {"y": float("-inf")}]}, id="inputs-nested-infinity"),
    # missing fields
    pytest.param("run_id", MISSING, id="missing-run_id"),
    pytest.param("flow_id", MISSING, id="missing-flow_id"),
    pytest.param("connection_id", MISSING, id="missing-connection_id"),
    pytest.param("requested_by", MISSING, id="missing-requested_by"),
    pytest.param("mode", MISSING, id="missing-mode"),
    # unknown fields
    pytest.param("target", "m1", id="unknown-field"),
    pytest.param("Run_id", "r2", id="unknown-field-differs-only-in-case"),
    # bad enum values (case-sensitive, exact)
    pytest.param("mode", "both", id="mode-unknown"),
    pytest.param("mode", "Attended", id="mode-wrong-case"),
    pytest.param("mode", "", id="mode-empty"),
    pytest.param("priority", "urgent", id="priority-unknown"),
    pytest.param("priority", "HIGH", id="priority-wrong-case"),
    # empty and too-long strings
    pytest.param("run_id", "", id="run_id-empty"),
    pytest.param("run_id", "r" * 129, id="run_id-129-chars"),
    pytest.param("connection_id", "c" * 129, id="connection_id-129-chars"),
    pytest.param("flow_id", "", id="flow_id-empty"),
    pytest.param("flow_id", "f" * 257, id="flow_id-257-chars"),
    pytest.param("requested_by", "u" * 257, id="requested_by-257-chars"),
    # ids end up in AMQP names and Redis keys
    pytest.param("run_id", "run 1", id="run_id-space"),
    pytest.param("run_id", "run/1", id="run_id-slash"),
    pytest.param("run_id", "run\\1", id="run_id-backslash"),
    pytest.param("run_id", "run-1\n", id="run_id-trailing-newline"),
    pytest.param("run_id", "run\n1", id="run_id-newline"),
    pytest.param("run_id", "run\t1", id="run_id-tab"),
    pytest.param("run_id", "run*", id="run_id-glob"),
    pytest.param("run_id", "rün", id="run_id-non-ascii"),
    pytest.param("connection_id", "c 1", id="connection_id-space"),
    pytest.param("connection_id", "../c1", id="connection_id-path"),
    pytest.param("connection_id", "c1\r\n", id="connection_id-crlf"),
    # too deep
    pytest.param("inputs", _nested(MAX_INPUT_DEPTH), id="inputs-one-level-too-deep"),
    pytest.param("inputs", _nested_list(MAX_INPUT_DEPTH), id="inputs-lists-one-level-too-deep"),
]


@pytest.mark.parametrize(("field", "value"), INVALID)
def test_invalid_run_requests_are_refused(field: str, value: Any) -> None:
    payload = request_payload()
    if value is MISSING:
        del payload[field]
    else:
        payload[field] = value
    with pytest.raises(ValidationError):
        _parse(payload)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("{", id="truncated"),
        pytest.param("not json", id="not-json"),
        pytest.param("null", id="null"),
        pytest.param("[]", id="array"),
        pytest.param('"run"', id="string"),
        pytest.param("{}", id="empty-object"),
        pytest.param(
            '{"run_id": "r", "run_id": 5, "flow_id": "f", "connection_id": "c",'
            ' "requested_by": "u", "mode": "attended"}',
            id="duplicate-key-with-a-bad-value",
        ),
    ],
)
def test_messages_that_are_not_run_requests_are_refused(text: str) -> None:
    with pytest.raises(ValidationError):
        RunRequest.model_validate_json(text)


def test_pathologically_deep_json_is_refused_without_crashing() -> None:
    inputs = '{"a":' * 10_000 + "1" + "}" * 10_000
    text = json.dumps(request_payload())[:-1] + f', "inputs": {inputs}}}'
    with pytest.raises(ValidationError):
        RunRequest.model_validate_json(text)


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        pytest.param({}, {"priority": Priority.normal, "inputs": {}}, id="minimal"),
        pytest.param({"mode": "unattended"}, {"mode": Mode.unattended}, id="unattended"),
        pytest.param({"priority": "high"}, {"priority": Priority.high}, id="high-priority"),
        pytest.param(
            {"run_id": "A-z_0.9:run@host", "connection_id": "conn.1:x@y-z_"},
            {"run_id": "A-z_0.9:run@host"},
            id="ids-with-every-allowed-punctuation",
        ),
        pytest.param({"run_id": "r" * 128}, {"run_id": "r" * 128}, id="run_id-128-chars"),
        pytest.param({"flow_id": "f" * 256}, {"flow_id": "f" * 256}, id="flow_id-256-chars"),
        pytest.param(
            {"flow_id": "Invoice / Überweisung\tv2"},
            {"flow_id": "Invoice / Überweisung\tv2"},
            id="flow_id-is-free-text",
        ),
        pytest.param(
            {"inputs": {"n": 1, "s": "x", "l": [1, 2.5, None, True], "o": {"k": "v"}}},
            {"inputs": {"n": 1, "s": "x", "l": [1, 2.5, None, True], "o": {"k": "v"}}},
            id="inputs-any-json",
        ),
        pytest.param(
            {"inputs": _nested(MAX_INPUT_DEPTH - 1)},
            {"inputs": _nested(MAX_INPUT_DEPTH - 1)},
            id="inputs-at-the-depth-limit",
        ),
        pytest.param(
            {"inputs": _nested_list(MAX_INPUT_DEPTH - 1)},
            {"inputs": _nested_list(MAX_INPUT_DEPTH - 1)},
            id="inputs-lists-at-the-depth-limit",
        ),
        pytest.param(
            {"queue_timeout_s": 600, "max_run_s": 0.5},
            {"queue_timeout_s": 600, "max_run_s": 0.5},
            id="limits-int-and-float",
        ),
        pytest.param(
            {"queue_timeout_s": None, "max_run_s": None},
            {"queue_timeout_s": None, "max_run_s": None},
            id="limits-null",
        ),
        pytest.param(
            {"submitted_at": "2025-03-01T12:00:00Z"},
            {"submitted_at": "2025-03-01T12:00:00+00:00"},
            id="submitted_at-iso",
        ),
    ],
)
def test_valid_run_requests_are_accepted(overrides: dict[str, Any], check: dict[str, Any]) -> None:
    run = _parse(request_payload(**overrides))
    for name, expected in check.items():
        actual = getattr(run, name)
        if name == "submitted_at":
            actual = actual.isoformat()
        assert actual == expected


def test_run_requests_are_frozen() -> None:
    run = _parse(request_payload())
    with pytest.raises(ValidationError):
        run.run_id = "other"  # type: ignore[misc]


# --- Target: exactly one of machine_id or group_id ------------------------------------------


@pytest.mark.parametrize(
    ("payload", "key"),
    [
        ({"machine_id": "m1"}, "m:m1"),
        ({"group_id": "finance"}, "g:finance"),
        ({"machine_id": "m1", "group_id": None}, "m:m1"),
    ],
)
def test_target_names_one_machine_or_one_group(payload: dict[str, Any], key: str) -> None:
    assert Target.model_validate_json(json.dumps(payload)).key == key


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({}, id="neither"),
        pytest.param({"machine_id": None, "group_id": None}, id="both-null"),
        pytest.param({"machine_id": "m1", "group_id": "finance"}, id="both"),
        pytest.param({"machine_id": "m/1"}, id="bad-machine-id"),
        pytest.param({"group_id": "fin ance"}, id="bad-group-id"),
        pytest.param({"machine": "m1"}, id="unknown-field"),
    ],
)
def test_bad_targets_are_refused(payload: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Target.model_validate_json(json.dumps(payload))


# --- Connection: the fields each kind needs -------------------------------------------------

CREDENTIALS = {
    "connection_id": "c1",
    "owner": "alice@contoso.com",
    "kind": "credentials",
    "target": {"machine_id": "m1"},
    "username": "CONTOSO\\svc-fin",
}
SIGN_IN = {
    "connection_id": "s1",
    "owner": "bob@contoso.com",
    "kind": "sign_in",
    "target": {"group_id": "finance"},
    "account": "bob@contoso.com",
    "tenant_id": TENANT,
}


def _connection(base: dict[str, Any], **changes: Any) -> Connection:
    payload = {**base, **changes}
    payload = {name: value for name, value in payload.items() if value is not MISSING}
    return Connection.model_validate_json(json.dumps(payload))


@pytest.mark.parametrize(
    ("base", "changes", "kind", "session_user"),
    [
        (CREDENTIALS, {}, ConnectionKind.credentials, "CONTOSO\\svc-fin"),
        (
            CREDENTIALS,
            {"username": "svc@contoso.com"},
            ConnectionKind.credentials,
            "svc@contoso.com",
        ),
        (
            CREDENTIALS,
            {
                "secret_ref": {
                    "provider": "azure_key_vault",
                    "vault_url": "https://kv",
                    "secret_name": "s",
                }
            },
            ConnectionKind.credentials,
            "CONTOSO\\svc-fin",
        ),
        (SIGN_IN, {}, ConnectionKind.sign_in, "bob@contoso.com"),
        # the session a sign-in run uses is the signed-in account's, not the owner's
        (SIGN_IN, {"owner": "carol@contoso.com"}, ConnectionKind.sign_in, "bob@contoso.com"),
    ],
)
def test_valid_connections(
    base: dict[str, Any], changes: dict[str, Any], kind: ConnectionKind, session_user: str
) -> None:
    connection = _connection(base, **changes)
    assert connection.kind is kind
    assert connection.session_user == session_user


@pytest.mark.parametrize(
    ("base", "changes"),
    [
        pytest.param(CREDENTIALS, {"username": MISSING}, id="credentials-without-username"),
        pytest.param(CREDENTIALS, {"username": None}, id="credentials-username-null"),
        pytest.param(CREDENTIALS, {"username": ""}, id="credentials-username-empty"),
        pytest.param(SIGN_IN, {"account": MISSING}, id="sign-in-without-account"),
        pytest.param(SIGN_IN, {"tenant_id": MISSING}, id="sign-in-without-tenant"),
        pytest.param(SIGN_IN, {"tenant_id": "contoso"}, id="sign-in-tenant-not-a-guid"),
        pytest.param(SIGN_IN, {"tenant_id": TENANT + "\n"}, id="sign-in-tenant-trailing-newline"),
        pytest.param(CREDENTIALS, {"kind": "service_principal"}, id="unknown-kind"),
        pytest.param(CREDENTIALS, {"target": {}}, id="target-empty"),
        pytest.param(CREDENTIALS, {"target": "m1"}, id="target-not-an-object"),
        pytest.param(CREDENTIALS, {"connection_id": "c 1"}, id="bad-connection-id"),
        pytest.param(CREDENTIALS, {"password": "hunter2"}, id="plain-password-field"),
        pytest.param(
            CREDENTIALS,
            {"secret_ref": {"provider": "hashicorp", "vault_url": "https://v"}},
            id="unknown-secret-provider",
        ),
    ],
)
def test_bad_connections_are_refused(base: dict[str, Any], changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        _connection(base, **changes)


# --- Machine --------------------------------------------------------------------------------

MACHINE = {"machine_id": "m1", "name": "FIN-01"}


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"max_unattended_runs": 0}, id="no-slots"),
        pytest.param({"max_unattended_runs": 11}, id="more-than-10-slots"),
        pytest.param({"os": "windows_11"}, id="unknown-os"),
        pytest.param({"join_type": "azure_ad"}, id="unknown-join-type"),
        pytest.param({"allowed_registration_tenants": ["contoso"]}, id="tenant-not-a-guid"),
        pytest.param({"machine_id": "m 1"}, id="bad-id"),
    ],
)
def test_bad_machines_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Machine.model_validate_json(json.dumps({**MACHINE, **changes}))


@pytest.mark.parametrize("slots", [1, 10])
def test_machine_slots_range(slots: int) -> None:
    payload = {**MACHINE, "max_unattended_runs": slots}
    assert Machine.model_validate_json(json.dumps(payload)).max_unattended_runs == slots


def test_machine_defaults() -> None:
    machine = Machine.model_validate_json(json.dumps(MACHINE))
    assert machine.max_unattended_runs == 1
    assert machine.maintenance is False
    assert machine.allowed_registration_tenants == ()
