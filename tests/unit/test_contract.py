"""The published contract: docs/contract/ is what the code generates (JSON Schemas from the
pydantic models, the AsyncAPI document from names.py), and the README's examples are valid
messages by those schemas and by the models the dispatcher decodes with."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from dispatcher.models import CancelRequest, Run, RunRequest
from dispatcher.tools.contract import EVENT_STATUSES, rendered

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CONTRACT = REPO / "docs" / "contract"
README = (REPO / "README.md").read_text()


def schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CONTRACT / name).read_text())
    return loaded


def test_the_committed_contract_is_what_the_code_generates() -> None:
    stale = [
        name
        for name, text in rendered().items()
        if not (CONTRACT / name).exists() or (CONTRACT / name).read_text() != text
    ]
    assert not stale, f"{stale} out of date: run `python -m dispatcher contract`"


def readme_run_request() -> dict[str, Any]:
    section = README.split("**Run request**", 1)[1]
    block = re.search(r"```json\n(.*?)```", section, re.S)
    assert block is not None, "the README's run request example is gone"
    example: dict[str, Any] = json.loads(block.group(1))
    return example


def readme_cancel() -> dict[str, Any]:
    line = README.split("**Cancel**", 1)[1].split("\n\n", 1)[0]
    match = re.search(r"`(\{.*?\})`", line)
    assert match is not None, "the README's cancel example is gone"
    example: dict[str, Any] = json.loads(match.group(1))
    return example


def test_the_readme_examples_are_valid_messages() -> None:
    request = readme_run_request()
    jsonschema.validate(request, schema("run-request.schema.json"))
    RunRequest.model_validate_json(json.dumps(request))
    cancel = readme_cancel()
    jsonschema.validate(cancel, schema("cancel.schema.json"))
    CancelRequest.model_validate_json(json.dumps(cancel))


@pytest.mark.parametrize(
    "change",
    [
        {"mode": "sometimes"},
        {"run_id": "has space"},
        {"unknown_field": 1},
        {"max_run_s": -5},
    ],
)
def test_the_schema_refuses_what_the_dispatcher_refuses(change: dict[str, Any]) -> None:
    request = {**readme_run_request(), **change}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(request, schema("run-request.schema.json"))
    with pytest.raises(ValueError):
        RunRequest.model_validate_json(json.dumps(request))


def test_an_event_record_is_valid_by_the_event_schema() -> None:
    run = Run.model_validate(
        {
            **readme_run_request(),
            "status": "failed",
            "submitted_at": 1.0,
            "target": "g:finance",
            "connection_kind": "credentials",
            "machine_id": "m1",
            "fence": 3,
            "finished_at": 9.5,
            "error": {"code": "FlowFailed", "message": "the flow failed"},
        }
    )
    event = run.model_dump(mode="json", exclude={"timeline", "reasons", "cancel_requested"})
    jsonschema.validate(event, schema("event.schema.json"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**event, "status": "lost"}, schema("event.schema.json"))


def test_the_asyncapi_document_names_every_routing_key_and_its_schemas() -> None:
    document = yaml.safe_load((CONTRACT / "asyncapi.yaml").read_text())
    assert document["asyncapi"].startswith("2.")
    channels = document["channels"]
    for status in EVENT_STATUSES:
        assert f"run.{status}" in README, status  # the README lists the same events
        channel = channels[f"{{ns}}.events/run.{status}.*"]  # run.<status>.<submitter>
        assert channel["bindings"]["amqp"]["exchange"]["type"] == "topic"
    refs = re.findall(r"\$ref: \./([\w.-]+)", (CONTRACT / "asyncapi.yaml").read_text())
    assert refs and all((CONTRACT / ref).exists() for ref in refs)
    assert channels["{ns}.requests/submit"]["publish"]["message"]["payload"] == {
        "$ref": "./run-request.schema.json"
    }
