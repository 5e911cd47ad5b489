"""The public contract, published: JSON Schemas of the messages a cloud flow exchanges with the
dispatcher (run request, cancel, event), generated from the pydantic models, and an AsyncAPI
document of the exchanges and routing keys, generated from :mod:`dispatcher.names`.

``python -m dispatcher contract --output docs/contract`` rewrites them; a test fails when the
committed files differ from what the code generates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from dispatcher import __version__
from dispatcher.models import CancelRequest, Run, RunRequest
from dispatcher.names import TERMINAL_EVENT_KEYS, Names

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
BASE_ID = "https://rundispatch.example/contract/"
EVENT_STATUSES = (
    "queued",
    "dispatched",
    "started",
    "rejected",
    *(key.removeprefix("run.") for key in TERMINAL_EVENT_KEYS),
)


# Constraints pydantic leaves in its own words on a union of number types.
_KEYWORDS = {"gt": "exclusiveMinimum", "ge": "minimum", "lt": "exclusiveMaximum", "le": "maximum"}


def _standard(node: Any, in_properties: bool = False) -> Any:
    """The schema with pydantic's leftover ``gt``/``ge``/``lt``/``le`` as JSON Schema words
    (numeric keywords ignore other types, so they may stay on the union)."""
    if isinstance(node, list):
        return [_standard(item) for item in node]
    if not isinstance(node, dict):
        return node
    fixed = {}
    for key, value in node.items():
        name = key if in_properties else _KEYWORDS.get(key, key)
        fixed[name] = _standard(value, in_properties=key == "properties" and not in_properties)
    return fixed


def _schema(model: type[Any], name: str, title: str, mode: str) -> dict[str, Any]:
    schema: dict[str, Any] = _standard(model.model_json_schema(mode=mode))
    schema = {"$schema": SCHEMA_DIALECT, "$id": BASE_ID + name, **schema, "title": title}
    return schema


def schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema of each message of the contract."""
    event = _schema(Run, "event.schema.json", "Run event", "serialization")
    # Events carry the run's record without its timeline (and without internal fields).
    for internal in ("timeline", "reasons", "cancel_requested"):
        event["properties"].pop(internal, None)
    event["$defs"].pop("TimelineEvent", None)
    event["description"] = (
        "The run's record, published on every status change to the events exchange with "
        "routing key run.<status>.<submitter> (the registered submitter that sent the request, "
        "'-' for the dispatcher's own identity). Delivery is at least once: deduplicate on "
        "(run_id, status)."
    )
    return {
        "run-request.schema.json": _schema(
            RunRequest, "run-request.schema.json", "Run request", "validation"
        ),
        "cancel.schema.json": _schema(
            CancelRequest, "cancel.schema.json", "Cancel request", "validation"
        ),
        "event.schema.json": event,
    }


def asyncapi(names: Names | None = None) -> dict[str, Any]:
    """The AsyncAPI 2.6 document of the exchanges and routing keys cloud flows use."""
    names = names or Names("{ns}")
    request = {"$ref": "./run-request.schema.json"}
    cancel = {"$ref": "./cancel.schema.json"}
    event = {"$ref": "./event.schema.json"}
    json_message = {"contentType": "application/json"}
    channels: dict[str, Any] = {
        f"{names.requests_exchange}/submit": {
            "description": "Run requests. Persistent, at most RUNDISPATCH_MAX_REQUEST_BYTES; "
            "run_id is the idempotency key.",
            "bindings": {"amqp": _exchange(names.requests_exchange, "direct", "submit")},
            "publish": {
                "operationId": "submitRun",
                "message": {**json_message, "name": "RunRequest", "payload": request},
            },
        },
        f"{names.requests_exchange}/cancel": {
            "description": "Cancel a queued, dispatched or running run. Taken from a "
            "submitter acting for the run's owner or from an operator (user_id set to its "
            "broker user); refused, and dead-lettered, from anyone else.",
            "bindings": {"amqp": _exchange(names.requests_exchange, "direct", "cancel")},
            "publish": {
                "operationId": "cancelRun",
                "message": {**json_message, "name": "CancelRequest", "payload": cancel},
            },
        },
    }
    for status in EVENT_STATUSES:
        channels[f"{names.events_exchange}/run.{status}.*"] = {
            "description": f"A run became {status}. Bind a queue of your own to follow runs: "
            "a submitter binds run.<status>.<its name> (its broker permissions allow no "
            "other), an operator any key.",
            "bindings": {"amqp": _exchange(names.events_exchange, "topic", f"run.{status}.*")},
            "subscribe": {
                "operationId": f"run_{status}",
                "message": {**json_message, "name": f"run.{status}", "payload": event},
            },
        }
    channels[names.dead_queue] = {
        "description": "Messages that are not valid requests, with the reason in header "
        "x-rundispatch-reason (a quorum queue behind the fanout exchange of the same name).",
        "bindings": {
            "amqp": {
                "is": "queue",
                "queue": {"name": names.dead_queue, "durable": True, "exclusive": False},
                "bindingVersion": "0.2.0",
            }
        },
        "subscribe": {"operationId": "deadLetters", "message": {"name": "DeadLetter"}},
    }
    return {
        "asyncapi": "2.6.0",
        "info": {
            "title": "rundispatch AMQP contract",
            "version": __version__,
            "description": "Every name is prefixed by the namespace RUNDISPATCH_NAMESPACE "
            "(shown as {ns}; default rundispatch).",
        },
        "defaultContentType": "application/json",
        "channels": channels,
    }


def _exchange(name: str, kind: str, routing_key: str) -> dict[str, Any]:
    return {
        "is": "routingKey",
        "exchange": {"name": name, "type": kind, "durable": True, "autoDelete": False},
        "bindingVersion": "0.2.0",
        "x-routing-key": routing_key,
    }


def rendered() -> dict[str, str]:
    """File name -> text, exactly as committed under docs/contract/."""
    files = {name: json.dumps(schema, indent=2) + "\n" for name, schema in schemas().items()}
    files["asyncapi.yaml"] = yaml.safe_dump(asyncapi(), sort_keys=False, width=100)
    return files


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in rendered().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
