"""The one slack setting of the test suite.

Correctness is decided by event order, gated flows and fake clocks. Where a time bound *is*
the behaviour under test (a queue deadline enforced "within 2 s", a retry that gives up at its
deadline), the test compares with ``bound(seconds)``: the bound the product promises, times
``RUNDISPATCH_TEST_SLACK`` (default 1.5). A slow or loaded machine is not a wrong product:
raise the setting there (``RUNDISPATCH_TEST_SLACK=4 make test``) instead of editing a test.
Timing targets (how fast, how many per second) belong to the benchmark, not to the tests.
"""

from __future__ import annotations

import os

DEFAULT = 1.5


def factor() -> float:
    """``RUNDISPATCH_TEST_SLACK`` as a number >= 1 (a bound is never tightened)."""
    raw = os.environ.get("RUNDISPATCH_TEST_SLACK", "")
    try:
        value = float(raw) if raw else DEFAULT
    except ValueError as exc:
        raise ValueError(f"RUNDISPATCH_TEST_SLACK must be a number, not {raw!r}") from exc
    return max(1.0, value)


def bound(seconds: float) -> float:
    """A promised bound of ``seconds``, with the machine's slack."""
    return seconds * factor()
