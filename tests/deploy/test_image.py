"""The image, built from deploy/Dockerfile with podman and run: its user, its commands, and a
real run through it (CLI, dispatcher and worker containers against the real RabbitMQ and
Redis). Marker ``container``: `make image-test` (a few minutes, so not part of `make test`).

The test machines reach package registries but no container registry, so the base image
`python:3.11-slim-bookworm` cannot be pulled. The test builds a stand-in with the same shape
(Debian bookworm with Python 3.11 and its venv module, from Debian's packages via debootstrap)
and passes it as PYTHON_IMAGE; everything else is the Dockerfile as shipped. The stand-in
trusts the CA bundle of the machine it is built on, as the machine's own pip does.

podman runs as root with its own storage (`.run/podman`, vfs), runc and cgroupfs, and the
host's network, so the containers reach the services on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .tools import REPO, require_tool, run

pytestmark = [pytest.mark.deploy, pytest.mark.container]

STATE = REPO / ".run" / "podman"
BASE = "localhost/rundispatch-test-base:bookworm"
IMAGE = "localhost/rundispatch:test"
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


class Podman:
    """podman with private storage and configuration (never the machine's default store)."""

    def __init__(self, binary: str, state: Path) -> None:
        self.binary = binary
        etc = state / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        # Limits equal to the current ones: a sandbox without CAP_SYS_RESOURCE cannot raise
        # them, and podman's defaults as root (1048576 files) would be a raise.
        import resource

        _, files = resource.getrlimit(resource.RLIMIT_NOFILE)
        (etc / "containers.conf").write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={files}:{files}", "nproc=32768:32768"]\n'
            "[engine]\n"
            'runtime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
        )
        (etc / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = "{state}/root"\nrunroot = "{state}/run"\n'
        )
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(etc / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(etc / "storage.conf"),
        }

    def __call__(
        self, *args: str | Path, timeout: float = 120, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run(self.binary, *args, timeout=timeout, env={**self.env, **(env or {})})

    def has_image(self, name: str) -> bool:
        return self("image", "exists", name).returncode == 0


def build_base(podman: Podman) -> None:
    debootstrap = require_tool("debootstrap", "apt-get install debootstrap: make tools")
    with tempfile.TemporaryDirectory(prefix="rundispatch-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        result = run(
            debootstrap, "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", rootfs,
            DEBIAN_MIRROR, timeout=900,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        shutil.copyfile(
            "/etc/ssl/certs/ca-certificates.crt", rootfs / "etc/ssl/certs/ca-certificates.crt"
        )
        archive = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "-C", rootfs, "-cf", archive, "."], check=True)
        result = podman(
            "import", "--change", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
            "--change", 'CMD ["python3"]', archive, BASE, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def podman() -> Podman:
    binary = require_tool("podman", "apt-get install podman runc: make tools")
    require_tool("runc", "apt-get install runc: make tools")
    return Podman(binary, STATE)


@pytest.fixture(scope="module")
def image(podman: Podman) -> str:
    if not podman.has_image(BASE):
        build_base(podman)
    started = time.monotonic()
    result = podman(
        "build", "--format", "docker", "--network", "host", "--pull=never",
        "--build-arg", f"PYTHON_IMAGE={BASE}", "-f", REPO / "deploy" / "Dockerfile",
        "-t", IMAGE, REPO, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    print(f"image built in {time.monotonic() - started:.0f} s")
    # The previous build's image and stages are left untagged: drop them (private storage).
    podman("image", "prune", "--force", timeout=300)
    return IMAGE


def test_image_configuration(podman: Podman, image: str) -> None:
    result = podman("image", "inspect", image)
    assert result.returncode == 0, result.stderr
    (config,) = json.loads(result.stdout)
    settings = config["Config"]
    assert settings["User"] == "10001:10001"
    assert settings["Entrypoint"] == ["rundispatch"]
    assert settings["Cmd"] == ["serve"]
    assert "9464/tcp" in settings["ExposedPorts"]
    assert settings["StopSignal"] == "SIGTERM"
    health = config.get("Healthcheck") or settings.get("Healthcheck")
    assert health and "/healthz" in " ".join(health["Test"])
    assert "RUNDISPATCH_METRICS_HOST=0.0.0.0" in settings["Env"]


@pytest.mark.parametrize(
    ("entrypoint", "args", "expected"),
    [
        ("rundispatch", ["--help"], "serve"),
        ("rundispatch", ["--version"], "0.1.0"),
        ("rundispatch-worker", ["serve", "--help"], "--machine-id"),
    ],
)
def test_console_scripts_run_in_the_image(
    podman: Podman, image: str, entrypoint: str, args: list[str], expected: str
) -> None:
    result = podman("run", "--rm", "--read-only", "--entrypoint", entrypoint, image, *args)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout + result.stderr


def test_runs_as_non_root_without_development_tools(podman: Podman, image: str) -> None:
    probe = (
        "import importlib.util, os, sys\n"
        "def found(name):\n"
        "    try:\n"
        "        return importlib.util.find_spec(name) is not None\n"
        "    except ModuleNotFoundError:\n"
        "        return False\n"
        "names = ('devtools', 'dispatcher.devtools', 'tests', 'pytest', 'ruff', 'mypy', 'pip',"
        " 'setuptools', 'hypothesis')\n"
        "print(os.getuid(), os.getgid(), [n for n in names if found(n)], sys.prefix)\n"
    )
    result = podman("run", "--rm", "--entrypoint", "python3", image, "-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["10001", "10001", "[]", "/opt/rundispatch"]
    listing = podman("run", "--rm", "--entrypoint", "ls", image, "-A", "/")
    assert "src" not in listing.stdout.split()  # the build stage's source tree stays behind


# ---- a run through the image ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return int(response.status)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture
def namespace_env() -> Iterator[dict[str, str]]:
    """A private namespace on the real services, deleted afterwards."""
    key = base64.b64encode(os.urandom(32)).decode()
    env = {
        "RUNDISPATCH_NAMESPACE": f"img{uuid.uuid4().hex[:10]}",
        "RUNDISPATCH_AMQP_URL": os.environ.get(
            "RUNDISPATCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"
        ),
        "RUNDISPATCH_REDIS_URL": os.environ.get(
            "RUNDISPATCH_REDIS_URL", "redis://127.0.0.1:6379/0"
        ),
        "RUNDISPATCH_SECRET_KEYS": f"test:{key}",
        "RUNDISPATCH_HEARTBEAT_INTERVAL_S": "1",
        "RUNDISPATCH_LOG_FORMAT": "text",
    }
    yield env
    from dispatcher.bootstrap import purge_namespace  # product code, imported late
    from dispatcher.settings import Settings

    settings = Settings(
        namespace=env["RUNDISPATCH_NAMESPACE"],
        amqp_url=env["RUNDISPATCH_AMQP_URL"],
        redis_url=env["RUNDISPATCH_REDIS_URL"],
    )
    asyncio.run(purge_namespace(settings, ["m1"]))


def test_a_run_goes_through_dispatcher_and_worker_containers(
    podman: Podman, image: str, namespace_env: dict[str, str], tmp_path: Path
) -> None:
    fleet = {
        "environment": {"tenant_id": "11111111-2222-3333-4444-555555555555"},
        "groups": [{"group_id": "g1", "name": "Group one"}],
        "machines": [
            {"machine_id": "m1", "name": "M1", "group_id": "g1", "os": "windows_server",
             "join_type": "entra_joined", "max_unattended_runs": 1},
        ],
        "connections": [
            {"connection_id": "c1", "owner": "alice@contoso.com", "kind": "credentials",
             "target": {"group_id": "g1"}, "username": "CONTOSO\\svc", "password": "pw"},
        ],
    }  # fmt: skip
    (tmp_path / "fleet.json").write_text(json.dumps(fleet))
    tmp_path.chmod(0o755)
    (tmp_path / "fleet.json").chmod(0o644)
    # Settings travel as -e NAME (values from this process's environment), never on the
    # command line.
    passed = [arg for name in namespace_env for arg in ("-e", name)]
    common = ["--network", "host", "--read-only", "--tmpfs", "/tmp", *passed]
    tag = namespace_env["RUNDISPATCH_NAMESPACE"]
    dispatcher_port, worker_port = free_port(), free_port()

    def podman_env(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return podman(*args, timeout=timeout, env=namespace_env)

    applied = podman_env("run", "--rm", *common, "-v", f"{tmp_path}:/fleet:ro", image,
                         "apply", "/fleet/fleet.json")  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    containers = [f"{tag}-dispatcher", f"{tag}-worker"]
    state_volume = f"{tag}-worker-state"
    try:
        started = podman_env(
            "run", "-d", "--name", containers[0], *common,
            "-e", f"RUNDISPATCH_METRICS_PORT={dispatcher_port}", image,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        started = podman_env(
            "run", "-d", "--name", containers[1], *common,
            # A fresh named volume takes the ownership of the image's directory (the Compose
            # file relies on that for the workers' state).
            "-v", f"{state_volume}:/var/lib/rundispatch", "--entrypoint", "rundispatch-worker",
            image, "serve", "--machine-id", "m1", "--executor", "simulate",
            "--state-dir", "/var/lib/rundispatch/state", "--metrics-port", str(worker_port),
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        for name, port in zip(containers, (dispatcher_port, worker_port), strict=True):
            try:
                wait_http(f"http://127.0.0.1:{port}/metrics", 90)
            except OSError:
                logs = podman("logs", name)
                pytest.fail(
                    f"{name} serves no /metrics:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}"
                )
        # The image's HEALTHCHECK, run the way the engine runs it.
        health = podman("healthcheck", "run", containers[0])
        assert health.returncode == 0, health.stdout + health.stderr

        submitted = podman_env(
            "run", "--rm", *common, image, "submit", "--connection", "c1", "--flow", "f1",
            "--requested-by", "alice@contoso.com", "--mode", "unattended",
            "--input", "duration_s=0.2", "--wait", "--timeout", "90", "--json", timeout=150,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        run_record = json.loads(submitted.stdout)
        assert run_record["status"] == "succeeded", run_record
        assert run_record["machine_id"] == "m1"

        # SIGTERM (podman stop) ends the dispatcher cleanly, well within its grace.
        stop_started = time.monotonic()
        stopped = podman("stop", "--time", "30", containers[0], timeout=60)
        took = time.monotonic() - stop_started
        assert stopped.returncode == 0, stopped.stderr
        state = podman("inspect", "--format", "{{.State.ExitCode}}", containers[0])
        assert state.stdout.strip() == "0", podman("logs", containers[0]).stderr[-3000:]
        assert took < 30, f"the dispatcher took {took:.1f} s to stop"
    finally:
        for name in containers:
            podman("rm", "--force", "--time", "5", name)
        podman("volume", "rm", "--force", state_volume)
