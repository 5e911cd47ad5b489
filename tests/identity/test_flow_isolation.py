"""The ``command`` executor gives the flow only what the run needs: a minimal environment
without the worker's settings, the secret on stdin, and (``--run-as``) another user, who cannot
read the worker's key file. Real processes; the user switch needs root."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from dispatcher.crypto import WorkerKeyPair
from dispatcher.errors import ConfigurationError
from workers.executors import CommandExecutor, FlowContext, RunAs

pytestmark = pytest.mark.unit

SECRET = {"kind": "password", "username": "CONTOSO\\svc", "password": "Pw-KNOWN-7f3a"}

# Reports its environment, what it read on stdin, who it runs as and whether it can read the
# file named in its inputs.
PROBE = """\
import json, os, sys
run = json.load(sys.stdin)
try:
    with open(run["inputs"]["key_file"], "rb"):
        key_readable = True
except OSError:
    key_readable = False
json.dump({"env": dict(os.environ), "run": run, "uid": os.getuid(),
           "key_readable": key_readable, "argv": sys.argv}, sys.stdout)
"""


def context(key_file: Path) -> FlowContext:
    return FlowContext(
        run_id="r1",
        flow_id="invoice",
        user="CONTOSO\\svc",
        inputs={"key_file": str(key_file), "amount": 10},
        secret=SECRET,
    )


def worker_environment() -> dict[str, str]:
    """What a worker's environment holds in a demo or a test: its settings and credentials."""
    return {
        **os.environ,
        "RUNDISPATCH_AMQP_URL": "amqp://dispatcher:broker-pw@localhost:5672/",
        "RUNDISPATCH_REDIS_URL": "redis://:redis-pw@localhost:6379/0",
        "RUNDISPATCH_SECRET_KEYS": "k1:c2VjcmV0LWtleS1vZi10aGUtZGlzcGF0Y2hlci0xMjM=",
        "RUNDISPATCH_CLIENT_SECRET": "client-secret-KNOWN",
        "AWS_SECRET_ACCESS_KEY": "another-credential",
        "HOME": "/home/worker",
    }


async def test_a_flow_sees_a_minimal_environment_and_reads_its_secret_on_stdin(
    tmp_path: Path,
) -> None:
    program = tmp_path / "probe.py"
    program.write_text(PROBE)
    keys = tmp_path / "state" / "worker.key"
    WorkerKeyPair.load_or_create(keys)
    executor = CommandExecutor({}, [sys.executable, "-I", "-S", str(program)], None,
                               worker_environment())  # fmt: skip
    result = await executor.run(context(keys))
    assert result.succeeded, result.message
    seen = result.outputs
    env: dict[str, str] = seen["env"]
    assert not [name for name in env if name.startswith("RUNDISPATCH_")]
    assert set(env) <= {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "TEMP", "TMP"}
    assert "PATH" in env and "HOME" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert not [v for v in env.values() if SECRET["password"] in v]
    assert SECRET["password"] not in " ".join(seen["argv"])
    assert seen["run"] == {
        "run_id": "r1",
        "fence": 0,
        "flow_id": "invoice",
        "user": "CONTOSO\\svc",
        "inputs": {"key_file": str(keys), "amount": 10},
        "secret": SECRET,
    }
    assert keys.stat().st_mode & 0o777 == 0o600
    assert keys.parent.stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(
    not hasattr(os, "getuid") or os.getuid() != 0 or not Path("/usr/bin/python3").exists(),
    reason="switching to another user needs root and a system python",
)
async def test_a_flow_run_as_another_user_cannot_read_the_worker_key(tmp_path: Path) -> None:
    shared = Path("/tmp") / f"rundispatch-flow-{tmp_path.name}"
    shared.mkdir(mode=0o755, exist_ok=True)
    try:
        program = shared / "probe.py"
        program.write_text(PROBE)
        program.chmod(0o644)
        keys = tmp_path / "state" / "worker.key"
        WorkerKeyPair.load_or_create(keys)
        assert WorkerKeyPair.load_or_create(keys)  # the worker itself reads it
        nobody = RunAs.lookup("nobody")
        executor = CommandExecutor(
            {}, ["/usr/bin/python3", "-I", "-S", str(program)], nobody, worker_environment()
        )
        result = await executor.run(context(keys))
        assert result.succeeded, result.message
        seen = result.outputs
        assert seen["uid"] == nobody.uid != os.getuid()
        assert seen["key_readable"] is False
        assert seen["env"]["HOME"] == nobody.home and seen["env"]["USER"] == "nobody"
        assert not [name for name in seen["env"] if name.startswith("RUNDISPATCH_")]
        assert json.dumps(seen["run"]["secret"]) == json.dumps(SECRET)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_an_unknown_run_as_user_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="no user"):
        CommandExecutor.from_options("true", None, "no-such-user-here")
