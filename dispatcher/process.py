"""A serving process: the signals that end it, gracefully, and its garbage collector."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

log = logging.getLogger(__name__)

# Container objects allocated between two young collections (CPython's default: 700). A
# replica receiving 2,000 heartbeats a second holds each batch for the gather and a script
# call (~0.1-0.2 s): with the default, young collections ran every few milliseconds, found each
# batch still alive and promoted it, and the promoted batches brought on a full collection of
# the whole heap (~0.3 s of CPU at 10,000 machines) every 20 s or so. With 20,000 the batches
# are freed before a young collection finds them (bench/README.md, "Live fleet at 10,000
# machines", item 13).
YOUNG_COLLECTION_EVERY = 20_000


def tune_garbage_collector() -> None:
    """Collect young objects less often (``YOUNG_COLLECTION_EVERY``); the older generations
    keep CPython's defaults relative to it."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, middle, old)


class Stopper:
    """SIGTERM and SIGINT (and SIGBREAK: a Windows service stop arrives as a console Ctrl+C or
    Ctrl+Break): set ``event``; while the process is still starting (waiting for RabbitMQ or
    Redis), cancel it right away."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.starting = True
        self._task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        wanted = (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGBREAK", None))
        for sig in (s for s in wanted if s is not None):
            try:
                loop.add_signal_handler(sig, self.signal)
            except NotImplementedError:  # Windows: no loop signal handlers
                signal.signal(sig, lambda *_: loop.call_soon_threadsafe(self.signal))
            except ValueError:  # not the main thread (tests)
                continue

    def signal(self) -> None:
        self.event.set()
        if self.starting and self._task is not None:
            self._task.cancel()

    async def wait(self) -> None:
        """Started: wait for the signal."""
        self.starting = False
        await self.event.wait()

    def stopped_while_starting(self) -> bool:
        """Whether a cancellation was the signal arriving while starting."""
        if self.event.is_set():
            log.info("stopped while starting")
            return True
        return False
