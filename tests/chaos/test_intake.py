"""Hostile input found by the fuzz test: it must come out as an invalid message (dead-lettered
with a reason), never as an exception that crashes the whole batch."""

from __future__ import annotations

import json

import pytest

from dispatcher.core.decode import decode
from dispatcher.errors import InvalidMessage

pytestmark = pytest.mark.unit

BASE = {
    "run_id": "r1",
    "flow_id": "f",
    "connection_id": "c1",
    "requested_by": "alice@contoso.com",
    "mode": "unattended",
}


@pytest.mark.parametrize("field", ["queue_timeout_s", "max_run_s", "submitted_at"])
@pytest.mark.parametrize("value", [10**400, -(10**400)])
def test_integers_no_float_can_hold_are_invalid(field: str, value: int) -> None:
    body = json.dumps({**BASE, field: value}).encode()
    with pytest.raises(InvalidMessage):
        decode(
            body,
            content_type="application/json",
            content_encoding=None,
            kind="submit",
            max_bytes=64 * 1024,
        )
