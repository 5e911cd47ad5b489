"""What a test needs besides Python: skipped on a workstation without it, a failure under CI.

``CI`` (set by CI) or ``RUNDISPATCH_REQUIRE_TOOLS`` turn a missing tool into a failure, so a
CI run that lacks one cannot pass by skipping the tests that need it.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def tools_required() -> bool:
    return bool(os.environ.get("CI") or os.environ.get("RUNDISPATCH_REQUIRE_TOOLS"))


def missing(message: str) -> NoReturn:
    """Skip (or, under CI, fail) because ``message`` says what is missing."""
    if tools_required():
        pytest.fail(f"{message}, and CI requires it")
    pytest.skip(message)
