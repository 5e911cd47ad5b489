"""The run store's encodings: built once (``adapters/redis/codec.py``), read back the same."""

from __future__ import annotations

import json

import pytest

from dispatcher.adapters.redis import codec
from dispatcher.codes import ErrorCode
from dispatcher.models import (
    AssignedRun,
    Assignment,
    ConnectionKind,
    Mode,
    QueuedHead,
    RunError,
    RunStatus,
)
from dispatcher.usecases.ports import Claim
from tests.support.builders import request

pytestmark = pytest.mark.unit


def test_an_assignment_round_trips_through_its_one_encoding() -> None:
    req = request(run_id="r1", mode="unattended", inputs={"batch": [1, 2]}, max_run_s=90)
    req_json = codec.request_fields(req, 1.0)[1]  # the stored "req" fragment
    claim = Claim(
        head=QueuedHead("r1", 1.0, "c1|unattended|normal"),
        target="g:bots",
        machine_id="m1",
        user='CONTOSO\\svc "fin"',
        connection_kind=ConnectionKind.credentials,
        max_run_s=600.0,
        sealed_secret="sx1.abc.def",
        slots=2,
        fence=7,
    )
    text = codec.assignment_json(7, codec.assignment_head(claim), req_json)
    assignment = Assignment.model_validate_json(text)
    assert assignment == Assignment(
        fence=7,
        machine_id="m1",
        mode=Mode.unattended,
        user='CONTOSO\\svc "fin"',
        connection_kind=ConnectionKind.credentials,
        max_run_s=600.0,
        sealed_secret="sx1.abc.def",
        request=json.loads(req_json),
    )
    assert (assignment.run_id, assignment.inputs, assignment.time_limit_s) == (
        "r1",
        {"batch": [1, 2]},
        90.0,
    )


def test_an_assigned_value_is_mode_fence_user() -> None:
    value = codec.encode_assigned("attended", 12, "contoso\\alice|x")
    assert value == "attended|12|contoso\\alice|x"
    assert codec.decode_assigned("r1", value) == AssignedRun(
        run_id="r1", mode=Mode.attended, fence=12, user="contoso\\alice|x"
    )


def test_a_record_is_spliced_from_its_fragments_and_parsed_back() -> None:
    req = request(run_id="r1", mode="attended")
    fields = dict(zip(*[iter(codec.request_fields(req, 5.0))] * 2, strict=True))
    error = RunError(code=ErrorCode.QueueFull, message="full", detail={"n": 1})
    fields |= {
        "status": codec.fragment("rejected"),
        "error": codec.error_fragment(error),
        "_score": "5.0",
        "tl": "[" + codec.timeline_entry("rejected", 5.0, {"code": "QueueFull"}) + "]",
    }
    record = json.loads(codec.record_json(fields))
    assert record["status"] == "rejected" and "timeline" not in record and "_score" not in record
    assert record["error"] == {"code": "QueueFull", "message": "full", "detail": {"n": 1}}
    run = codec.parse_run(fields)
    assert run.status is RunStatus.rejected and run.error == error
    assert [(e.event, e.detail) for e in run.timeline] == [("rejected", {"code": "QueueFull"})]
    assert json.loads(codec.record_json(fields, with_timeline=True))["timeline"][0]["at"] == 5.0


@pytest.mark.parametrize(
    ("raw", "status"),
    [(b'"queued"', RunStatus.queued), ("null", None), (None, None), (b"", None)],
)
def test_a_stored_status_is_read_back(raw: object, status: RunStatus | None) -> None:
    assert codec.status_of(raw) is status
