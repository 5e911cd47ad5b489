"""A process whose wall clock is behind: Debian's libfaketime preloaded into it.

Only the wall clock (``time.time``, ``date``) is moved; the monotonic clock that asyncio's
timers and the AMQP heartbeats use is left alone, as on a host whose clock is set wrong.
``deploy/local/install-tools.sh`` installs the library (``libfaketime``); a test that asks for
it fails without it, it does not skip.
"""

from __future__ import annotations

import glob


def library() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        raise RuntimeError(
            "libfaketime is missing: run sh deploy/local/install-tools.sh "
            "(apt-get install -y libfaketime)"
        )
    return found[0]


def clock_behind(seconds: float) -> dict[str, str]:
    """The environment that sets a process's wall clock ``seconds`` behind."""
    return {
        "LD_PRELOAD": library(),
        "FAKETIME": f"-{seconds:g}s",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
