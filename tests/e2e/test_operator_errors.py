"""What an operator sees when something is wrong: one clear line (the variable, the key, the
service, the fix), a non-zero exit code, never a traceback. Each command runs as a process,
as an operator would run it, against the real services of the tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dispatcher.client import Client
from dispatcher.settings import Settings
from tests.e2e.test_run_path import group_fleet
from tests.support.e2e import cli
from tests.support.privateredis import free_port
from tests.support.processes import REPO, Processes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


# One command of each program.
COMMANDS = (("dispatcher", ["queue", "show"]), ("workers", ["serve", "--machine-id", "m1"]))


def run(
    procs: Processes, module: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = dict(procs.env)
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def failed(result: subprocess.CompletedProcess[str], code: int, *expected: str) -> str:
    """The command exited with ``code``, said every ``expected`` text, printed no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output, output
    for text in expected:
        assert text in output, output
    return output


def test_an_unreachable_redis_is_one_line_in_every_kind_of_command(procs: Processes) -> None:
    down = {"RUNDISPATCH_REDIS_URL": f"redis://:hunter2@127.0.0.1:{free_port()}/0"}
    for args in (
        ["queue", "show"],
        ["machines", "list"],
        ["runs", "show", "r1"],
        ["machines", "maintenance", "m1", "on"],
        ["redrive", "--since", "-1h", "--dry-run"],
    ):
        output = failed(run(procs, "dispatcher", *args, env=down), 3, "cannot reach", "Redis")
        assert "hunter2" not in output


def test_an_unreachable_rabbitmq_is_one_line(procs: Processes, tmp_path: Path) -> None:
    down = {"RUNDISPATCH_AMQP_URL": f"amqp://guest:s3cr3t@127.0.0.1:{free_port()}/"}
    submit = ["submit", "--connection", "c1", "--flow", "f", "--requested-by", "a@b.c"]
    output = failed(
        run(procs, "dispatcher", *submit, "--mode", "attended", env=down),
        3,
        "cannot reach",
        "RabbitMQ",
    )
    assert "s3cr3t" not in output
    fleet = tmp_path / "fleet.json"
    fleet.write_text(json.dumps(group_fleet(1)))
    failed(run(procs, "dispatcher", "apply", str(fleet), env=down), 3, "RabbitMQ")


def test_a_service_stopped_while_waiting_for_redis_exits_cleanly(procs: Processes) -> None:
    env = dict(procs.env)
    env["RUNDISPATCH_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    for argv in (["dispatcher", "serve"], ["workers", "serve", "--machine-id", "m1"]):
        state = ["--state-dir", str(procs.workdir / "state")] if argv[0] == "workers" else []
        proc = subprocess.Popen(
            [sys.executable, "-m", *argv, *state],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # Signalled once it is retrying its connection to Redis (its handlers are set then).
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.stdout is not None:
            line = proc.stdout.readline()
            seen.append(line)
            if "retrying" in line or not line:
                break
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=20)
        output = "".join(seen) + rest
        assert proc.returncode == 0, output
        assert "Traceback" not in output and "stopped while starting" in output, output


def test_bad_settings_name_their_variables_and_what_they_accept(procs: Processes) -> None:
    bad = {
        "RUNDISPATCH_LOG_FORMAT": "xml",
        "RUNDISPATCH_PREFETCH": "0",
        "RUNDISPATCH_NAMESPACE": "has space",
        "RUNDISPATCH_METRICS_PORT": "lots",
    }
    for module, args in (
        ("dispatcher", ["queue", "show"]),
        ("workers", ["serve", "--machine-id", "m1"]),
    ):
        output = failed(run(procs, module, *args, env=bad), 2, "invalid settings")
        assert "RUNDISPATCH_LOG_FORMAT: Input should be 'text' or 'json' (got 'xml')" in output
        assert "RUNDISPATCH_PREFETCH: Input should be greater than or equal to 1" in output
        assert "RUNDISPATCH_NAMESPACE: expected 1 to 64 letters" in output
        assert "RUNDISPATCH_METRICS_PORT" in output
        assert "validation error" not in output  # no pydantic dump naming fields


def test_a_secret_setting_is_never_echoed(procs: Processes) -> None:
    # A secret that fails validation is named, its value never shown.
    env = {"RUNDISPATCH_SECRET_KEYS": "not-a-key-list", "RUNDISPATCH_PREFETCH": "-1"}
    output = run(procs, "dispatcher", "queue", "show", env=env)
    assert "not-a-key-list" not in output.stdout + output.stderr


def test_unknown_keys_in_the_settings_file_are_an_error(procs: Processes, tmp_path: Path) -> None:
    settings_file = tmp_path / "rundispatch.env"
    settings_file.write_text("RUNDISPATCH_LOG_LEVEL=debug\nRUNDISPATCH_PREFECH=10\n")
    env = {"RUNDISPATCH_SETTINGS_FILE": str(settings_file)}
    for module, args in (
        ("dispatcher", ["queue", "show"]),
        ("workers", ["serve", "--machine-id", "m1"]),
    ):
        failed(
            run(procs, module, *args, env=env),
            2,
            "unknown keys in the settings file",
            "RUNDISPATCH_PREFECH: not a setting (did you mean RUNDISPATCH_PREFETCH?)",
        )
    missing = {"RUNDISPATCH_SETTINGS_FILE": str(tmp_path / "nope.env")}
    failed(run(procs, "dispatcher", "queue", "show", env=missing), 2, "no such file")
    settings_file.write_text("RUNDISPATCH_LOG_LEVEL=debug\n")  # known keys only: accepted
    assert run(procs, "dispatcher", "queue", "show", env=env).returncode == 0


def test_a_key_file_others_can_read_is_refused_without_a_traceback(procs: Processes) -> None:
    state = procs.workdir / "state-m1"
    state.mkdir()
    key = state / "worker.key"
    key.write_text("not even a key")
    os.chmod(key, 0o644)
    args = ["serve", "--machine-id", "m1", "--state-dir", str(state)]
    failed(run(procs, "workers", *args), 2, "is accessible by others", "chmod 600")
    os.chmod(key, 0o600)
    failed(run(procs, "workers", *args), 2, "cannot be read")


async def test_apply_keeps_cli_maintenance_and_dry_run_shows_the_diff(
    client: Client, settings: Settings, procs: Processes, apply_fleet: Any, tmp_path: Path
) -> None:
    document = group_fleet(2)
    apply_fleet(document)
    cli(procs, "machines", "maintenance", "m1", "on")
    path = tmp_path / "fleet.json"
    # Re-applying the same file keeps the maintenance set from the CLI.
    document["machines"][1]["max_unattended_runs"] = 2
    path.write_text(json.dumps(document))
    dry = cli(procs, "apply", str(path), "--dry-run").stdout
    assert dry.splitlines() == ["~ machine m2: max_unattended_runs 4 -> 2"], dry
    fleet = await client.rt.fleet.load(force=True)
    assert fleet.machines["m2"].max_unattended_runs == 4  # a dry run changes nothing
    cli(procs, "apply", str(path))
    fleet = await client.rt.fleet.load(force=True)
    assert fleet.machines["m1"].maintenance is True
    assert fleet.machines["m2"].max_unattended_runs == 2
    assert cli(procs, "apply", str(path), "--dry-run").stdout.strip() == "no changes"
    # The file may say otherwise: then it wins.
    document["machines"][0]["maintenance"] = False
    del document["machines"][1]
    path.write_text(json.dumps(document))
    dry = cli(procs, "apply", str(path), "--dry-run", "--prune").stdout.splitlines()
    assert dry == ["~ machine m1: maintenance true -> false", "- machine m2"], dry
    cli(procs, "apply", str(path), "--prune")
    fleet = await client.rt.fleet.load(force=True)
    assert fleet.machines["m1"].maintenance is False and "m2" not in fleet.machines
