"""Queue deadlines and run time limits (SPEC §3, limits and time-outs)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from dispatcher.core.deadlines import queue_deadline, run_time_limit
from dispatcher.models import ConnectionKind

pytestmark = pytest.mark.unit

CREDENTIALS = ConnectionKind.credentials
SIGN_IN = ConnectionKind.sign_in
HOUR = 3600.0
T0 = 1_700_000_000.0


@dataclass(frozen=True)
class Case:
    id: str
    kind: ConnectionKind
    expected: float
    requested: float | None = None
    refresh_expires_at: float | None = None
    default: float = 6 * HOUR
    sign_in_limit: float = HOUR


CASES = [
    Case("credentials-default-6h", CREDENTIALS, T0 + 6 * HOUR),
    Case("credentials-configured-default", CREDENTIALS, T0 + 12 * HOUR, default=12 * HOUR),
    Case("credentials-request-shortens", CREDENTIALS, T0 + 600, requested=600),
    Case("credentials-request-cannot-lengthen", CREDENTIALS, T0 + 6 * HOUR, requested=48 * HOUR),
    # The sign-in cap and the refresh token do not concern credentials connections.
    Case("credentials-ignore-sign-in-cap", CREDENTIALS, T0 + 6 * HOUR, sign_in_limit=60),
    Case(
        "credentials-ignore-refresh-token",
        CREDENTIALS,
        T0 + 6 * HOUR,
        refresh_expires_at=T0 + 1,
    ),
    Case("sign-in-capped-at-1h", SIGN_IN, T0 + HOUR),
    Case("sign-in-default-below-cap", SIGN_IN, T0 + 1800, default=1800),
    Case("sign-in-request-shortens", SIGN_IN, T0 + 300, requested=300),
    Case("sign-in-request-cannot-lengthen", SIGN_IN, T0 + HOUR, requested=6 * HOUR),
    Case("sign-in-refresh-token-expires-first", SIGN_IN, T0 + 900, refresh_expires_at=T0 + 900),
    Case("sign-in-refresh-token-expires-later", SIGN_IN, T0 + HOUR, refresh_expires_at=T0 + 86_400),
    Case(
        "sign-in-refresh-token-before-request",
        SIGN_IN,
        T0 + 100,
        requested=300,
        refresh_expires_at=T0 + 100,
    ),
    # Already expired: the run times out at once instead of waiting for a token it cannot use.
    Case("sign-in-refresh-token-already-expired", SIGN_IN, T0 - 5, refresh_expires_at=T0 - 5),
    Case("short-test-limits", SIGN_IN, T0 + 2, default=5, sign_in_limit=2),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_queue_deadline(case: Case) -> None:
    deadline = queue_deadline(
        enqueued_at=T0,
        kind=case.kind,
        requested_timeout_s=case.requested,
        default_timeout_s=case.default,
        sign_in_timeout_s=case.sign_in_limit,
        refresh_token_expires_at=case.refresh_expires_at,
    )
    assert deadline == case.expected


# SPEC §3 contrasts `queue_timeout_s` ("may only shorten") with `max_run_s`, which it calls the
# per-run setting of the run time limit: a request's `max_run_s` replaces the default, longer
# or shorter.
@pytest.mark.parametrize(
    ("requested", "default", "expected"),
    [
        (None, 24 * HOUR, 24 * HOUR),
        (None, 30.0, 30.0),
        (600, 24 * HOUR, 600.0),
        (0.5, 24 * HOUR, 0.5),
        (48 * HOUR, 24 * HOUR, 48 * HOUR),
    ],
)
def test_run_time_limit(requested: float | None, default: float, expected: float) -> None:
    limit = run_time_limit(requested, default)
    assert limit == expected
    assert isinstance(limit, float)
