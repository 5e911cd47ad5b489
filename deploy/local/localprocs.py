"""Processes a local test harness starts under one directory, and the command line around them.

``ProcessGroup`` starts each server in its own process group and working directory under the
harness's directory, kills them all on ``stop_all`` (also at interpreter exit), and deletes the
directory. A harness started by an ``up`` command outlives it: the pids go to a state file, and
``down`` (another process) adopts them and kills only those still running in that directory,
never a pid the system has since given to someone else.

``command_line`` is the ``up | status | down [--dir DIR]`` interface both harnesses share.
Standard library only: these scripts run before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

STATE_FILE = "state.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_answers(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout):
            return True
    except OSError:
        return False


def wait_until(
    condition: Callable[[], bool],
    timeout_s: float,
    error: Callable[[], Exception],
    *,
    ignore: tuple[type[BaseException], ...] = (OSError,),
    every_s: float = 0.05,
) -> None:
    """Poll ``condition`` until it holds; raise ``error()`` after ``timeout_s``. Exceptions in
    ``ignore`` count as "not yet" (a server still starting refuses connections)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(*ignore):
            if condition():
                return
        if time.monotonic() > deadline:
            raise error()
        time.sleep(every_s)


class ProcessGroup:
    """Servers started under ``workdir`` (a new temporary directory by default)."""

    def __init__(self, workdir: Path | None, prefix: str) -> None:
        self._own_dir = workdir is None
        self.dir = workdir or Path(tempfile.mkdtemp(prefix=prefix))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._adopted: dict[str, int] = {}

    def claim_dir(self) -> None:
        """Refuse a directory that holds anything (``stop_all`` deletes it), then create it and
        make sure everything started is stopped at interpreter exit, whatever happens."""
        if self.dir.exists() and any(self.dir.iterdir()):
            raise RuntimeError(f"{self.dir} is not empty: give a new or empty directory")
        self.dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop_all)

    def spawn(
        self, name: str, argv: Sequence[str], *, cwd: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own process group and in ``cwd`` (under the directory: how
        ``down`` recognises it later); its output goes to ``cwd/stdout.log``."""
        cwd.mkdir(parents=True, exist_ok=True)
        with (cwd / "stdout.log").open("ab") as output:
            proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def running(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def kill(self, name: str) -> None:
        """SIGKILL the process group started as ``name`` and reap it."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        _kill_group(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def stop_all(self) -> None:
        """Kill everything started or adopted, then delete the directory if it is ours (made
        here, or holding a state file)."""
        atexit.unregister(self.stop_all)
        for name in list(self.procs):
            self.kill(name)
        adopted = [pid for pid in self._adopted.values() if self._started_here(pid)]
        for pid in adopted:
            _kill_group(pid)
        deadline = time.monotonic() + 10
        while any(self._started_here(pid) for pid in adopted) and time.monotonic() < deadline:
            time.sleep(0.1)  # not our children: wait until they are gone
        self._adopted.clear()
        if self._own_dir or (self.dir / STATE_FILE).exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    def save_state(self, **data: Any) -> None:
        """Write the pids and ``data`` (ports, names...) for a later ``status`` or ``down``."""
        pids = {name: proc.pid for name, proc in self.procs.items() if proc.poll() is None}
        (self.dir / STATE_FILE).write_text(json.dumps({"pids": pids, **data}, indent=2))

    def load_state(self) -> dict[str, Any]:
        """The state an ``up`` left, adopting its processes. Raises if there is none."""
        path = self.dir / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"nothing started in {self.dir} (no {STATE_FILE})")
        state: dict[str, Any] = json.loads(path.read_text())
        self._adopted = {name: int(pid) for name, pid in state.get("pids", {}).items()}
        return state

    def adopted_running(self, name: str) -> bool:
        pid = self._adopted.get(name)
        return pid is not None and self._started_here(pid)

    def detach(self) -> None:
        """Leave the processes running when this object goes (``up`` hands them to ``down``)."""
        atexit.unregister(self.stop_all)
        self.procs.clear()

    def _started_here(self, pid: int) -> bool:
        try:
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            return False  # gone (or a zombie waiting to be reaped)
        return cwd.is_relative_to(self.dir.resolve())


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class Harness(Protocol):
    """What ``command_line`` drives: a cluster or group of local servers."""

    processes: ProcessGroup
    boot_s: float

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def describe(self) -> list[str]: ...


def command_line(
    argv: list[str],
    *,
    prog: str,
    description: str,
    default_dir: Path,
    make: Callable[[argparse.Namespace], Harness],
    attach: Callable[[Path], Harness],
    errors: tuple[type[Exception], ...],
    up_options: Callable[[argparse.ArgumentParser], object] = lambda parser: None,
) -> int:
    """``PROG up|status|down [--dir DIR]``. ``up`` starts what ``make`` builds and leaves it
    running; ``status`` and ``down`` find it again in the directory with ``attach``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    up_options(sub.add_parser("up", help="start everything and print the addresses"))
    sub.add_parser("status", help="show what runs, and where")
    sub.add_parser("down", help="kill everything and delete the directory")
    for command in sub.choices.values():
        command.add_argument(
            "--dir", default=str(default_dir), help=f"the working directory (default {default_dir})"
        )
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            harness = make(args)
            print(f"starting in {args.dir} ...", file=sys.stderr)
            harness.start()
            print("\n".join(harness.describe()))
            print(f"up in {harness.boot_s:.1f} s; stop with: {sys.argv[0]} down --dir {args.dir}")
            harness.processes.detach()  # it outlives this command on purpose
            return 0
        harness = attach(Path(args.dir))
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.command == "status":
        print("\n".join(harness.describe()))
    else:
        harness.stop()
        print(f"stopped everything and deleted {args.dir}")
    return 0
