"""Decoding what arrives on the requests queue: a run request or a cancel, or a clear reason
why the message is not one (it then goes to the dead-letter queue)."""

from __future__ import annotations

from pydantic import ValidationError

from dispatcher.errors import InvalidMessage
from dispatcher.models import CancelRequest, RunRequest

ENCODINGS = {None, "", "utf-8", "identity"}


def _summarise(error: ValidationError) -> tuple[str, str]:
    items = error.errors(include_url=False, include_input=False)
    kinds = {item["type"] for item in items}
    if "json_invalid" in kinds:
        return "invalid_json", "body is not valid JSON: " + items[0]["msg"]
    if "model_type" in kinds or "model_attributes_type" in kinds:
        return "not_an_object", "body is not a JSON object"
    if "recursion_loop" in kinds:
        return "schema", "body nests too deep"
    parts = []
    for item in items[:5]:
        location = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{location}: {item['msg']}")
    more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
    return "schema", "; ".join(parts) + more


def is_json_type(content_type: str | None) -> bool:
    """``application/json``, optionally with ``charset=utf-8``; none at all is taken as JSON."""
    if not content_type:
        return True
    media, _, parameters = content_type.partition(";")
    if media.strip().lower() != "application/json":
        return False
    for parameter in filter(None, (p.strip() for p in parameters.split(";"))):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in {
            "utf-8",
            "utf8",
        }:
            return False
    return True


def decode(
    body: bytes,
    *,
    content_type: str | None,
    content_encoding: str | None,
    kind: str,
    max_bytes: int,
) -> RunRequest | CancelRequest:
    """Validate one message; raise InvalidMessage with the reason for the dead-letter header
    and its reason class for the metric."""
    if len(body) > max_bytes:
        raise InvalidMessage(
            reason_class="oversize", reason=f"body is {len(body)} bytes; the limit is {max_bytes}"
        )
    if not is_json_type(content_type):
        raise InvalidMessage(
            reason_class="content_type", reason=f"content type {content_type!r} is not JSON"
        )
    if content_encoding not in ENCODINGS:
        raise InvalidMessage(
            reason_class="encoding",
            reason=f"content encoding {content_encoding!r} is not supported",
        )
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage(
            reason_class="encoding", reason=f"body is not UTF-8 at byte {exc.start}"
        ) from exc
    model: type[RunRequest] | type[CancelRequest] = (
        CancelRequest if kind == "cancel" else RunRequest
    )
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        reason_class, reason = _summarise(exc)
        raise InvalidMessage(reason_class=reason_class, reason=reason) from exc
    except RecursionError as exc:
        raise InvalidMessage(reason_class="schema", reason="body nests too deep") from exc
    except (ValueError, TypeError, ArithmeticError) as exc:
        # Validation code that fails on hostile input instead of reporting it, e.g. an
        # integer no float can hold (OverflowError from the finite-number check). Without
        # this the whole batch would crash and be redelivered until its delivery limit.
        raise InvalidMessage(
            reason_class="schema",
            reason=f"body could not be validated: {type(exc).__name__}: {exc}"[:300],
        ) from exc
