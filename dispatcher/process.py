"""A serving process's stop: the signals that end it, gracefully."""

from __future__ import annotations

import asyncio
import logging
import signal

log = logging.getLogger(__name__)


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
