"""Executors run one flow. ``simulate`` for demos and tests; ``command`` runs a program per flow
with the inputs as JSON on stdin and takes its JSON stdout as outputs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
from dataclasses import dataclass, field
from typing import Any, Protocol

from dispatcher.codes import ErrorCode


@dataclass(frozen=True)
class FlowResult:
    """How a flow ended. ``executor_error``: the executor itself failed to run the flow
    (``start_failed``, ``crashed``, ``bad_output``), as the worker's metrics count it."""

    succeeded: bool
    outputs: dict[str, Any] = field(default_factory=dict)
    code: ErrorCode | None = None
    message: str = ""
    executor_error: str | None = None


@dataclass(frozen=True)
class FlowContext:
    run_id: str
    flow_id: str
    user: str
    inputs: dict[str, Any]
    secret: dict[str, Any]
    fence: int = 0


class Executor(Protocol):
    async def run(self, context: FlowContext) -> FlowResult: ...


class SimulateExecutor:
    """Waits ``inputs.duration_s`` (default 0.1 s) and ends with ``inputs.outcome``."""

    async def run(self, context: FlowContext) -> FlowResult:
        duration = context.inputs.get("duration_s", 0.1)
        if not isinstance(duration, int | float) or isinstance(duration, bool) or duration < 0:
            return FlowResult(False, code=ErrorCode.FlowFailed, message="duration_s must be >= 0")
        await asyncio.sleep(float(duration))
        outcome = context.inputs.get("outcome", "succeeded")
        if outcome == "failed":
            return FlowResult(False, code=ErrorCode.FlowFailed, message="the simulated flow failed")
        return FlowResult(True, outputs={"simulated": True, "duration_s": duration})


class CommandExecutor:
    """Runs the command configured for the flow (or the default command).

    The inputs go to stdin as JSON; stdout must be a JSON object (the outputs). The user and the
    secret are passed in the environment (``RUNDISPATCH_RUN_USER``, ``RUNDISPATCH_RUN_SECRET``),
    never on the command line, with the run's id and fencing token (``RUNDISPATCH_RUN_ID``,
    ``RUNDISPATCH_RUN_FENCE``). Cancelling the run kills the process.
    """

    def __init__(self, commands: dict[str, list[str]], default: list[str] | None) -> None:
        self.commands = commands
        self.default = default

    @classmethod
    def from_options(cls, command: str | None, command_map: str | None) -> CommandExecutor:
        commands: dict[str, list[str]] = {}
        if command_map:
            with open(command_map, encoding="utf-8") as handle:
                raw = json.load(handle)
            commands = {
                str(k): shlex.split(v) if isinstance(v, str) else list(v) for k, v in raw.items()
            }
        return cls(commands, shlex.split(command) if command else None)

    async def run(self, context: FlowContext) -> FlowResult:
        argv = self.commands.get(context.flow_id, self.default)
        if not argv:
            return _executor_failed("start_failed", f"no command for flow {context.flow_id!r}")
        env = dict(os.environ)
        env.update(
            RUNDISPATCH_RUN_ID=context.run_id,
            RUNDISPATCH_RUN_FENCE=str(context.fence),
            RUNDISPATCH_FLOW_ID=context.flow_id,
            RUNDISPATCH_RUN_USER=context.user,
            RUNDISPATCH_RUN_SECRET=json.dumps(context.secret),
        )
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
        except OSError as exc:  # no such program, not executable ...
            return _executor_failed(
                "start_failed", f"the flow's command could not start: {exc.strerror or exc}"
            )
        try:
            stdout, stderr = await process.communicate(json.dumps(context.inputs).encode())
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if process.returncode != 0:
            tail = stderr.decode(errors="replace").strip()[-500:]
            return _executor_failed(
                "crashed", f"the flow's command exited with {process.returncode}: {tail}"
            )
        try:
            outputs = json.loads(stdout or b"{}")
        except ValueError:
            return _executor_failed("bad_output", "stdout is not JSON")
        if not isinstance(outputs, dict):
            return _executor_failed("bad_output", "stdout is not an object")
        return FlowResult(True, outputs=outputs)


def _executor_failed(reason: str, message: str) -> FlowResult:
    return FlowResult(False, code=ErrorCode.FlowFailed, message=message, executor_error=reason)
