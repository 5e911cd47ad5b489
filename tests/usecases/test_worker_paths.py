"""The machine worker's less travelled paths, in process: what the command executor gives a
flow and how it fails, ``--command-map``, a sealed secret that does not open, a broken
sessions file, a flow past its run time limit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dispatcher.codes import ErrorCode
from dispatcher.models import RunStatus, Session, SessionState
from tests.support.fakes import FakeDelivery
from tests.usecases.test_worker import Machine, MachineFactory, machines
from workers.executors import CommandExecutor, FlowContext
from workers.sessions import SessionsFile

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

__all__ = ["machines"]  # the fixture, shared with tests/usecases/test_worker.py

ECHO = """
import json, os, sys
run = json.load(sys.stdin)  # the run on stdin: nothing of it in the environment
assert not [name for name in os.environ if name.startswith("RUNDISPATCH_")]
print(json.dumps({
    "inputs": run["inputs"],
    "run_id": run["run_id"],
    "fence": str(run["fence"]),
    "user": run["user"],
    "secret": run["secret"],
    "flow": run["flow_id"],
}))
"""


def program(tmp_path: Path, name: str, text: str) -> list[str]:
    path = tmp_path / name
    path.write_text(text)
    return [sys.executable, str(path)]


async def run_one(m: Machine, run_id: str = "r1", **inputs: object) -> RunStatus:
    delivery = await m.dispatch(run_id, **inputs)
    await m.worker.intake.handle([delivery])
    executed = await m.finish_one()
    return executed.outcome.status


async def test_a_command_gets_inputs_run_fence_user_and_opened_secret(
    machines: MachineFactory, tmp_path: Path
) -> None:
    m = machines(CommandExecutor({}, program(tmp_path, "echo.py", ECHO)))
    assert await run_one(m, n=7) is RunStatus.succeeded
    run = await m.world.run("r1")
    outputs = run.outputs or {}
    assert outputs["inputs"] == {"n": 7}
    assert outputs["run_id"] == "r1" and outputs["flow"] == run.flow_id
    assert outputs["fence"] == str(run.fence) and run.fence is not None and run.fence > 0
    assert outputs["user"] == "CONTOSO\\svc1"
    assert outputs["secret"] and "password" in json.dumps(outputs["secret"])


@pytest.mark.parametrize(
    ("text", "reason", "fragment"),
    [
        ("import sys; sys.stderr.write('boom'); sys.exit(3)", "crashed", "exited with 3: boom"),
        ("print('not json')", "bad_output", "stdout is not JSON"),
        ("print('[1, 2]')", "bad_output", "stdout is not an object"),
    ],
)
async def test_a_failing_command_fails_the_run_with_its_reason(
    machines: MachineFactory, tmp_path: Path, text: str, reason: str, fragment: str
) -> None:
    m = machines(CommandExecutor({}, program(tmp_path, "flow.py", text)))
    assert await run_one(m) is RunStatus.failed
    run = await m.world.run("r1")
    assert run.error is not None and run.error.code is ErrorCode.FlowFailed
    assert fragment in run.error.message
    assert m.metrics.named("executor_error") == [(reason,)]


async def test_a_flow_without_a_command_fails_without_starting_anything() -> None:
    executor = CommandExecutor({"known": ["true"]}, None)
    context = FlowContext("r1", "unknown", "u", {}, {})
    result = await executor.run(context)
    assert not result.succeeded and result.executor_error == "start_failed"
    assert "no command for flow 'unknown'" in result.message


async def test_the_command_map_picks_each_flow_s_command_and_the_default_the_rest(
    tmp_path: Path,
) -> None:
    mapped = program(tmp_path, "mapped.py", 'print(\'{"by": "map"}\')')
    default = program(tmp_path, "default.py", 'print(\'{"by": "default"}\')')
    listed = program(tmp_path, "listed.py", 'print(\'{"by": "list"}\')')
    command_map = tmp_path / "commands.json"
    command_map.write_text(json.dumps({"f1": " ".join(mapped), "f2": listed}))
    executor = CommandExecutor.from_options(" ".join(default), str(command_map))
    seen = {}
    for flow in ("f1", "f2", "f3"):
        result = await executor.run(FlowContext("r1", flow, "u", {}, {}))
        assert result.succeeded, result
        seen[flow] = result.outputs["by"]
    assert seen == {"f1": "map", "f2": "list", "f3": "default"}


async def test_a_sealed_secret_that_does_not_open_fails_the_run_without_running_it(
    machines: MachineFactory, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    m = machines(CommandExecutor({}, program(tmp_path, "f.py", f"open({str(marker)!r}, 'w')")))
    delivery = await m.dispatch("r1")
    assignment = json.loads(delivery.body)
    sealed = assignment["sealed_secret"]
    assert sealed
    # Another run's context: the seal is bound to the run it was made for.
    assignment["sealed_secret"] = sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")
    tampered = FakeDelivery(json.dumps(assignment).encode(), routing_key="m1", type="assign")
    await m.worker.intake.handle([tampered])
    executed = await m.finish_one()
    assert executed.outcome.status is RunStatus.failed
    run = await m.world.run("r1")
    assert run.error is not None and run.error.code is ErrorCode.FlowFailed
    assert "sealed secret does not open" in run.error.message
    assert sealed not in json.dumps(run.model_dump(mode="json"))
    assert not marker.exists()


def test_a_broken_sessions_file_keeps_the_last_good_sessions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "sessions.json"
    path.write_text(json.dumps([{"user": "CONTOSO\\alice", "state": "active"}]))
    sessions = SessionsFile(path)
    good = (Session(user="CONTOSO\\alice", state=SessionState.active),)
    assert sessions.changed() and sessions.read() == good and not sessions.changed()
    for broken in ("[{", json.dumps([{"user": "x", "state": "asleep"}]), json.dumps({"a": 1})):
        path.write_text(broken)
        assert sessions.read() == good
        assert "sessions file" in caplog.text and "invalid" in caplog.text
        caplog.clear()
    path.unlink()
    assert sessions.changed() and sessions.read() == ()
    assert SessionsFile(None).read() == () and not SessionsFile(None).changed()
