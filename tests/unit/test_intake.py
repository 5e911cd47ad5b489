"""Decoding the requests queue: what is a request, and the reason given when it is not."""

from __future__ import annotations

import json

import pytest

from dispatcher.core.decode import decode, is_json_type
from dispatcher.errors import InvalidMessage
from dispatcher.models import CancelRequest, RunRequest

pytestmark = pytest.mark.unit

VALID = {
    "run_id": "r1",
    "flow_id": "f",
    "connection_id": "c1",
    "requested_by": "alice@contoso.com",
    "mode": "unattended",
}


@pytest.mark.parametrize(
    ("content_type", "json_like"),
    [
        (None, True),
        ("", True),
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ('Application/JSON;charset="UTF-8"', True),
        ("application/json; charset=latin-1", False),
        ("text/plain", False),
        ("application/jsonx", False),
    ],
)
def test_content_types(content_type: str | None, json_like: bool) -> None:
    assert is_json_type(content_type) is json_like


def decode_body(body: bytes, **kw: object) -> RunRequest | CancelRequest:
    options: dict[str, object] = {
        "content_type": "application/json",
        "content_encoding": None,
        "kind": "submit",
        "max_bytes": 4096,
    }
    options.update(kw)
    return decode(body, **options)  # type: ignore[arg-type]


def test_valid_request_and_cancel() -> None:
    assert isinstance(decode_body(json.dumps(VALID).encode()), RunRequest)
    cancel = decode_body(b'{"run_id": "r1"}', kind="cancel")
    assert isinstance(cancel, CancelRequest) and cancel.run_id == "r1"


@pytest.mark.parametrize(
    ("body", "options", "reason_class", "fragment"),
    [
        (b"x" * 5000, {}, "oversize", "limit is 4096"),
        (json.dumps(VALID).encode(), {"content_type": "text/plain"}, "content_type", "not JSON"),
        (json.dumps(VALID).encode(), {"content_encoding": "gzip"}, "encoding", "gzip"),
        (b"\xff\xfe{}", {}, "encoding", "UTF-8"),
        (b"{not json", {}, "invalid_json", "not valid JSON"),
        (b"[1, 2]", {}, "not_an_object", "not a JSON object"),
        (json.dumps({**VALID, "mode": "sometimes"}).encode(), {}, "schema", "mode"),
        (json.dumps({**VALID, "extra": 1}).encode(), {}, "schema", "extra"),
        (json.dumps({**VALID, "run_id": "a b"}).encode(), {}, "schema", "run_id"),
        (
            b'{"run_id": "r1", "queue_timeout_s": 1e999}',
            {"kind": "cancel"},
            "schema",
            "queue_timeout_s",
        ),
    ],
)
def test_bad_messages_say_why(
    body: bytes, options: dict[str, object], reason_class: str, fragment: str
) -> None:
    with pytest.raises(InvalidMessage) as caught:
        decode_body(body, **options)
    assert caught.value.reason_class == reason_class
    assert fragment in caught.value.reason
