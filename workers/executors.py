"""Executors run one flow. ``simulate`` for demos and tests; ``command`` runs a program per flow
with the run (its inputs and its opened secret) as JSON on stdin and takes its JSON stdout as
outputs.

The flow gets only what the run needs: a minimal environment (the system variables of
:data:`FLOW_ENVIRONMENT`, nothing of the worker's settings, no ``RUNDISPATCH_*`` variable), the
secret on its stdin pipe (never in its environment, readable from ``/proc``, nor on its command
line), and, with ``run_as`` (POSIX), another user than the worker's, who cannot read the
worker's key file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from dispatcher.codes import ErrorCode
from dispatcher.errors import ConfigurationError


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


# The worker's environment variables a flow inherits: what programs need to start and to find
# their tools, on POSIX and on Windows. Everything else (the worker's settings and credentials,
# its home) stays with the worker.
FLOW_ENVIRONMENT = (
    "PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "TEMP", "TMP",
    "SYSTEMROOT", "SYSTEMDRIVE", "WINDIR", "COMSPEC", "PATHEXT",
)  # fmt: skip


def flow_environment(source: Mapping[str, str], run_as: RunAs | None = None) -> dict[str, str]:
    """The environment of a flow: :data:`FLOW_ENVIRONMENT` taken from ``source``, and the
    home and name of the user it runs as."""
    env = {name: source[name] for name in FLOW_ENVIRONMENT if name in source}
    if run_as is not None:
        env.update(HOME=run_as.home, USER=run_as.name, LOGNAME=run_as.name)
    return env


@dataclass(frozen=True)
class RunAs:
    """The POSIX user a flow runs as (the worker must be allowed to switch to it)."""

    name: str
    uid: int
    gid: int
    home: str

    @classmethod
    def lookup(cls, name: str) -> RunAs:
        import pwd  # POSIX only

        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise ConfigurationError(f"--run-as: no user {name!r} on this machine") from None
        return cls(name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


class CommandExecutor:
    """Runs the command configured for the flow (or the default command).

    stdin is one JSON object: ``{"run_id", "fence", "flow_id", "user", "inputs", "secret"}``
    (the secret as the worker opened it, ``{}`` when the connection has none); stdout must be a
    JSON object (the outputs). The environment is :func:`flow_environment`. Cancelling the run
    kills the process.
    """

    def __init__(
        self,
        commands: dict[str, list[str]],
        default: list[str] | None,
        run_as: RunAs | None = None,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        self.commands = commands
        self.default = default
        self.run_as = run_as
        self.env = flow_environment(os.environ if environment is None else environment, run_as)

    @classmethod
    def from_options(
        cls, command: str | None, command_map: str | None, run_as: str | None = None
    ) -> CommandExecutor:
        commands: dict[str, list[str]] = {}
        if command_map:
            with open(command_map, encoding="utf-8") as handle:
                raw = json.load(handle)
            commands = {
                str(k): shlex.split(v) if isinstance(v, str) else list(v) for k, v in raw.items()
            }
        user = RunAs.lookup(run_as) if run_as else None
        return cls(commands, shlex.split(command) if command else None, user)

    def _identity(self) -> dict[str, Any]:
        if self.run_as is None:
            return {}
        run_as = self.run_as
        return {"user": run_as.uid, "group": run_as.gid, "extra_groups": [], "cwd": "/"}

    async def run(self, context: FlowContext) -> FlowResult:
        argv = self.commands.get(context.flow_id, self.default)
        if not argv:
            return _executor_failed("start_failed", f"no command for flow {context.flow_id!r}")
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=dict(self.env),
                **self._identity(),
            )
        except (OSError, subprocess.SubprocessError) as exc:  # no such program, no such user
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return _executor_failed(
                "start_failed", f"the flow's command could not start: {message}"
            )
        stdin = {
            "run_id": context.run_id,
            "fence": context.fence,
            "flow_id": context.flow_id,
            "user": context.user,
            "inputs": context.inputs,
            "secret": context.secret,
        }
        try:
            stdout, stderr = await process.communicate(json.dumps(stdin).encode())
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
