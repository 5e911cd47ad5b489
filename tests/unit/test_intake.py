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
        ("application/json; charset=utf8", True),
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


REQUIRED_FIELDS = ("run_id", "flow_id", "connection_id", "requested_by", "mode")
FIVE_MISSING = "; ".join(f"{field}: Field required" for field in REQUIRED_FIELDS)
WRONG_TYPES = {
    "run_id": 1,
    "flow_id": 2,
    "connection_id": 3,
    "requested_by": 4,
    "mode": 5,
    "priority": 6,
}
FIVE_WRONG = (
    "run_id: Input should be a valid string; flow_id: Input should be a valid string; "
    "connection_id: Input should be a valid string; requested_by: Input should be a valid "
    "string; mode: Input should be 'attended' or 'unattended'"
)


@pytest.mark.parametrize(
    ("body", "reason_class", "reason"),
    [
        (b"[1, 2]", "not_an_object", "body is not a JSON object"),
        (b'"text"', "not_an_object", "body is not a JSON object"),
        (b"{}", "schema", FIVE_MISSING),
        (json.dumps(WRONG_TYPES).encode(), "schema", FIVE_WRONG + " (+1 more)"),
        (json.dumps({**WRONG_TYPES, "x": 1}).encode(), "schema", FIVE_WRONG + " (+2 more)"),
    ],
)
def test_the_whole_reason(body: bytes, reason_class: str, reason: str) -> None:
    """The reason in the dead-letter header, word for word: at most five errors, each with its
    field, then how many more."""
    with pytest.raises(InvalidMessage) as caught:
        decode_body(body)
    assert (caught.value.reason_class, caught.value.reason) == (reason_class, reason)


def test_broken_json_says_where() -> None:
    with pytest.raises(InvalidMessage) as caught:
        decode_body(b'{"run_id": ')
    assert caught.value.reason_class == "invalid_json"
    assert caught.value.reason.startswith("body is not valid JSON: Invalid JSON: ")
    assert caught.value.reason.endswith("EOF while parsing a value at line 1 column 11")


def test_a_body_of_exactly_the_limit_is_accepted() -> None:
    body = json.dumps(VALID).encode()
    assert isinstance(decode_body(body, max_bytes=len(body)), RunRequest)
    with pytest.raises(InvalidMessage):
        decode_body(body, max_bytes=len(body) - 1)
