"""What a cloud flow sends: a run request or a cancel (SPEC §2)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, field_validator

from dispatcher.models.base import MAX_INPUT_DEPTH, SafeId, Seconds, Strict, Text, depth_of


class Mode(StrEnum):
    attended = "attended"
    unattended = "unattended"


class Priority(StrEnum):
    high = "high"
    normal = "normal"


class RunRequest(Strict):
    """What a cloud flow sends (SPEC §2). ``run_id`` is the idempotency key."""

    run_id: SafeId
    flow_id: Text
    connection_id: SafeId
    requested_by: Text
    mode: Mode
    priority: Priority = Priority.normal
    inputs: dict[str, Any] = Field(default_factory=dict)
    # JSON has no NaN/Infinity; an infinite max_run_s would switch the run time limit off.
    queue_timeout_s: Seconds | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_run_s: Seconds | None = Field(default=None, gt=0, allow_inf_nan=False)
    submitted_at: datetime | None = Field(default=None, strict=False)
    # End the run at once (PredictedQueueTimeout) when the forecast is sure it misses its queue
    # deadline (docs/forecast.md); off by default.
    fail_early: bool = False

    @field_validator("inputs")
    @classmethod
    def _inputs_not_too_deep(cls, value: dict[str, Any]) -> dict[str, Any]:
        if depth_of(value, MAX_INPUT_DEPTH) > MAX_INPUT_DEPTH:
            raise ValueError(f"inputs nest deeper than {MAX_INPUT_DEPTH} levels")
        return value


class CancelRequest(Strict):
    """Cancel a run, over AMQP (routing key ``cancel``) or from the CLI."""

    run_id: SafeId
    reason: Annotated[str, Field(max_length=512)] | None = None
