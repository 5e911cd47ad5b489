#!/usr/bin/env python3
"""Make sure RabbitMQ and Redis answer, then run a command with them.

    python3 deploy/local/services.py [--private-only] -- COMMAND...

Uses the servers at RUNDISPATCH_AMQP_URL / RUNDISPATCH_REDIS_URL (defaults: localhost). When
one does not answer and its server is installed (rabbitmq-server, redis-server), a private one
is started on a free port with its own data directory, the command gets its URL, and it is
stopped when the command ends. When it is not installed, this says exactly what to install.
Standard library only: it runs before any virtual environment exists.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlparse

DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_ADMIN = "http://guest:guest@127.0.0.1:15672"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def answers(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or default_port), 1.0
        ):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, port: int, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if answers(url, port):
            return
        time.sleep(0.5)
    raise SystemExit(f"{what} did not start within {seconds:.0f} s")


def start_redis(workdir: str) -> tuple[str, subprocess.Popen[bytes]]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit(
            "Redis does not answer at RUNDISPATCH_REDIS_URL and redis-server is not installed.\n"
            "Install it (Debian/Ubuntu: apt-get install -y redis-server) or point "
            "RUNDISPATCH_REDIS_URL at a running Redis."
        )
    port = free_port()
    data = os.path.join(workdir, "redis")
    os.makedirs(data, exist_ok=True)
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            data,
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    wait_for(url, 6379, 20, "the private Redis")
    print(f"started a private Redis on port {port}", file=sys.stderr)
    return url, proc


def start_rabbitmq(workdir: str) -> tuple[str, subprocess.Popen[bytes], dict[str, str]]:
    binary = shutil.which("rabbitmq-server") or (
        "/usr/lib/rabbitmq/bin/rabbitmq-server"
        if os.path.exists("/usr/lib/rabbitmq/bin/rabbitmq-server")
        else None
    )
    if binary is None:
        raise SystemExit(
            "RabbitMQ does not answer at RUNDISPATCH_AMQP_URL and rabbitmq-server is not "
            "installed.\nInstall it (Debian/Ubuntu: apt-get install -y rabbitmq-server) or point "
            "RUNDISPATCH_AMQP_URL at a running RabbitMQ (3.10 or later, quorum queues)."
        )
    port, dist, management = free_port(), free_port(), free_port()
    base = os.path.join(workdir, "rabbitmq")
    os.makedirs(base, exist_ok=True)
    node = f"rundispatch{port}@localhost"
    conf = os.path.join(base, "rabbitmq.conf")
    with open(conf, "w", encoding="utf-8") as handle:
        handle.write(
            f"listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n"
            f"management.tcp.port = {management}\nmanagement.tcp.ip = 127.0.0.1\n"
        )
    # The management plugin: identities (machines register) are created through its API.
    with open(os.path.join(base, "plugins"), "w", encoding="utf-8") as handle:
        handle.write("[rabbitmq_management].\n")
    env = dict(os.environ)
    env.update(
        RABBITMQ_NODENAME=node,
        RABBITMQ_NODE_PORT=str(port),
        RABBITMQ_DIST_PORT=str(dist),
        RABBITMQ_MNESIA_BASE=os.path.join(base, "mnesia"),
        RABBITMQ_LOG_BASE=os.path.join(base, "log"),
        RABBITMQ_CONFIG_FILE=conf,
        RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(base, "plugins"),
        RABBITMQ_PID_FILE=os.path.join(base, "pid"),
        HOME=base,
    )
    run_as: dict[str, int] = {}
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("rabbitmq")  # shares the node's Erlang cookie
        except KeyError:
            user = None
        if user is not None:
            for root, dirs, files in os.walk(base):
                for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                    os.chown(name, user.pw_uid, user.pw_gid)
            env["HOME"] = user.pw_dir
            run_as = {"user": user.pw_uid, "group": user.pw_gid}
    proc = subprocess.Popen(
        [binary],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        **run_as,  # type: ignore[arg-type]
    )
    url = f"amqp://guest:guest@127.0.0.1:{port}/"
    print(f"starting a private RabbitMQ on port {port} (this takes ~20 s)...", file=sys.stderr)
    wait_for(url, port, 120, "the private RabbitMQ")
    admin = f"http://guest:guest@127.0.0.1:{management}"
    wait_for(admin, management, 60, "the private RabbitMQ's management API")
    time.sleep(3)  # the listener opens before the node has finished booting
    env["RUNDISPATCH_BROKER_ADMIN_URL"] = admin
    return url, proc, env


def enable_management(admin: str) -> None:
    """Enable the management plugin of the local RabbitMQ when its API does not answer
    (it is off on a fresh install); identities are created through it."""
    if answers(admin, 15672):
        return
    plugins = shutil.which("rabbitmq-plugins")
    if plugins is None:
        raise SystemExit(
            "RabbitMQ's management API does not answer at RUNDISPATCH_BROKER_ADMIN_URL: enable "
            "it (rabbitmq-plugins enable rabbitmq_management) or point the URL at it."
        )
    print("enabling RabbitMQ's management plugin", file=sys.stderr)
    subprocess.run([plugins, "enable", "rabbitmq_management"], check=False, capture_output=True)
    wait_for(admin, 15672, 60, "RabbitMQ's management API")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    command = argv[argv.index("--") + 1 :]
    amqp = os.environ.get("RUNDISPATCH_AMQP_URL", DEFAULT_AMQP)
    redis = os.environ.get("RUNDISPATCH_REDIS_URL", DEFAULT_REDIS)
    started: list[subprocess.Popen[bytes]] = []
    workdir = tempfile.mkdtemp(prefix="rundispatch-services-")
    os.chmod(workdir, 0o755)  # a private RabbitMQ runs as the rabbitmq user: it must get in
    env = dict(os.environ)
    try:
        if not answers(redis, 6379):
            redis, proc = start_redis(workdir)
            started.append(proc)
        admin = os.environ.get("RUNDISPATCH_BROKER_ADMIN_URL", DEFAULT_ADMIN)
        if not answers(amqp, 5672):
            amqp, proc, private = start_rabbitmq(workdir)
            started.append(proc)
            admin = private["RUNDISPATCH_BROKER_ADMIN_URL"]
        else:
            enable_management(admin)
        env["RUNDISPATCH_AMQP_URL"] = amqp
        env["RUNDISPATCH_BROKER_ADMIN_URL"] = admin
        env["RUNDISPATCH_REDIS_URL"] = redis
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 130
    finally:
        for proc in started:
            stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
