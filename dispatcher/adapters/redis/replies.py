"""What the run store's scripts answer, as typed results.

Every script returns a result word, then the outbox messages it recorded (each a list ``[id,
kind, routing key, body]``), then any extra values (a status fragment, a fencing token ...).
A call of a pipelined batch that failed on its own arrives as its exception: ``Failed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dispatcher.adapters.redis.codec import fence_of, status_of, text
from dispatcher.codes import ErrorCode
from dispatcher.usecases.results import (
    AdmitResult,
    CancelRequested,
    CancelResult,
    Claimed,
    ClaimResult,
    Conflict,
    Duplicate,
    Failed,
    Finished,
    FinishResult,
    Missing,
    NoSlot,
    NotDue,
    NotQueued,
    OutboxMessage,
    Queued,
    Refused,
    Rejected,
    RejectResult,
    Reordered,
    ReorderResult,
    Requeued,
    RequeueResult,
    Stale,
    Started,
    StartResult,
    Unqueued,
    UnqueueResult,
    UserBusy,
)

# Why admit.lua refused a run, as it says it.
ADMIT_REFUSALS = {
    "throttled": ErrorCode.DesktopFlowsActionThrottled,
    "queue_full": ErrorCode.QueueFull,
}


def split_reply(raw: Sequence[Any]) -> tuple[str, tuple[OutboxMessage, ...], list[Any]]:
    """A script's reply: its result word, the outbox messages, the other values."""
    word = text(raw[0])
    messages: list[OutboxMessage] = []
    extra: list[Any] = []
    for item in raw[1:]:
        if isinstance(item, list) and len(item) == 4:
            body = item[3] if isinstance(item[3], bytes) else str(item[3]).encode()
            messages.append(OutboxMessage(text(item[0]), text(item[1]), text(item[2]), body))
        else:
            extra.append(text(item) if isinstance(item, bytes) else item)
    return word, tuple(messages), extra


def admit_result(raw: Sequence[Any]) -> AdmitResult:
    word, messages, extra = split_reply(raw)
    if word == "queued":
        return Queued(messages=messages)
    if word == "rejected":
        return Rejected(code=ADMIT_REFUSALS[extra[0]], messages=messages)
    return Duplicate(status=status_of(extra[0]))


def reject_result(raw: Sequence[Any], code: ErrorCode) -> RejectResult:
    word, messages, extra = split_reply(raw)
    if word == "rejected":
        return Rejected(code=code, messages=messages)
    return Duplicate(status=status_of(extra[0]))


def claim_result(raw: Sequence[Any] | Exception) -> ClaimResult:
    if isinstance(raw, Exception):
        return Failed(error=repr(raw))
    word, messages, extra = split_reply(raw)
    if word == "ok":
        return Claimed(fence=int(extra[0]), messages=messages)
    if word == "user_busy":
        return UserBusy()
    if word == "no_slot":
        return NoSlot()
    return NotQueued()


def start_result(raw: Sequence[Any] | Exception) -> StartResult:
    if isinstance(raw, Exception):
        return Failed(error=repr(raw))
    word, messages, extra = split_reply(raw)
    if word == "ok":
        return Started(messages=messages)
    return Refused(status=status_of(extra[0]), fence=fence_of(extra[1]))


def finish_result(raw: Sequence[Any] | Exception) -> FinishResult:
    if isinstance(raw, Exception):
        return Failed(error=repr(raw))
    word, messages, extra = split_reply(raw)
    if word == "ok":
        return Finished(messages=messages)
    if word == "missing":
        return Missing()
    if word == "stale":
        return Stale(status=status_of(extra[0]), fence=fence_of(extra[1]))
    return Conflict(status=status_of(extra[0]))


def unqueue_result(raw: Sequence[Any]) -> UnqueueResult:
    word, messages, extra = split_reply(raw)
    if word == "ok":
        return Unqueued(messages=messages)
    if word == "not_due":
        return NotDue()
    return Conflict(status=status_of(extra[0]))


def requeue_result(raw: Sequence[Any]) -> RequeueResult:
    word, messages, extra = split_reply(raw)
    if word == "ok":
        return Requeued(messages=messages)
    return Conflict(status=status_of(extra[0]))


def reorder_result(raw: Sequence[Any]) -> ReorderResult:
    word, messages, extra = split_reply(raw)
    if word == "ok":
        return Reordered(messages=messages)
    return Conflict(status=status_of(extra[0]))


def cancel_result(raw: Sequence[Any]) -> CancelResult:
    word, messages, extra = split_reply(raw)
    if word == "ok":
        return CancelRequested(messages=messages)
    return Conflict(status=status_of(extra[0]))
