"""``python -m dispatcher serve``: wire a dispatcher replica and run it until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from dispatcher.adapters.runtime import STARTUP_WAIT_S, runtime
from dispatcher.crypto import Sealer
from dispatcher.handoff import Handoff
from dispatcher.service import Dispatcher
from dispatcher.settings import Settings
from dispatcher.wiring import identity_sources, metrics_for

log = logging.getLogger(__name__)


async def serve(settings: Settings, metrics_port: int | None = None) -> int:
    """Run one replica; returns the exit status."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with runtime(settings, wait_s=STARTUP_WAIT_S) as rt:
        metrics, exporter, reporter = metrics_for(settings, rt, metrics_port)
        tokens, passwords, closers = identity_sources(settings, rt, metrics)
        handoff = Handoff(
            tokens=tokens,
            passwords=passwords,
            seal=Sealer(),
            token_validity_s=settings.token_validity_s,
        )
        dispatcher = Dispatcher(
            settings=settings,
            amqp=rt.amqp,
            runs=rt.runs,
            fleet=rt.fleet,
            machines=rt.machines,
            handoff=handoff,
            tokens=tokens,
            metrics=metrics,
        )
        await dispatcher.start()
        if exporter is not None:
            exporter.set_up(True)
        reporter_task: asyncio.Task[None] | None = None
        if reporter is not None:
            reporter_task = asyncio.create_task(reporter())
        await stop.wait()
        log.info("stopping")
        if reporter_task:
            reporter_task.cancel()
        await dispatcher.stop()
        for close in closers:
            await close()
    return 0
