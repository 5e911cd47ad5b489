"""Queue deadlines (SPEC §3, limits and time-outs)."""

from __future__ import annotations

from dispatcher.models import ConnectionKind


def queue_deadline(
    *,
    enqueued_at: float,
    kind: ConnectionKind,
    requested_timeout_s: float | None,
    default_timeout_s: float,
    sign_in_timeout_s: float,
    refresh_token_expires_at: float | None = None,
) -> float:
    """The time a still-queued run times out.

    The default limit applies; sign-in connections are capped (1 h by default); a request's
    own ``queue_timeout_s`` may only shorten the limit; a sign-in run never waits past the
    refresh token's known expiry.
    """
    limit = default_timeout_s
    if kind is ConnectionKind.sign_in:
        limit = min(limit, sign_in_timeout_s)
    if requested_timeout_s is not None:
        limit = min(limit, requested_timeout_s)
    deadline = enqueued_at + limit
    if kind is ConnectionKind.sign_in and refresh_token_expires_at is not None:
        deadline = min(deadline, refresh_token_expires_at)
    return deadline


def run_time_limit(requested_max_run_s: float | None, default_max_run_s: float) -> float:
    """The run time limit of a run: the request's ``max_run_s`` or the default."""
    if requested_max_run_s is None:
        return default_max_run_s
    return float(requested_max_run_s)
