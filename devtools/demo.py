"""``make demo`` / ``python -m devtools.demo``: the product end to end on this machine.

Starts a local identity provider, applies an example fleet, registers its machines and a
submitter (each gets its own broker identity), signs a "connect with sign-in" connection in
with the device code flow, starts a dispatcher and four simulated machine workers (each under
its machine's identity, with no Redis), submits as the submitter a mixed workload (unattended
and attended runs, high priority, failures, a rejection, a run that waits for a locked session
and times out, a sign-in connection whose access token is refreshed while the demo runs),
shows live progress and ends with a summary.
Everything lives in a private namespace, removed at the end (``--keep`` keeps it); the
identities are removed at the end in any case.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from devtools.demo_fleet import MACHINES, OWNERS, SUBMITTER, TENANT, fleet, sessions
from devtools.demo_summary import start_idp, summary
from devtools.server import AdminClient
from dispatcher.bootstrap import purge_namespace
from dispatcher.client import Client
from dispatcher.models import RunStatus
from dispatcher.settings import Settings
from dispatcher.tools.worker_runtime import worker_broker

CLIENT_ID = "rundispatch-demo"
TOKEN_LIFETIME_S = 310  # msal refreshes a token with < 5 min left: a refresh every ~10 s


def say(text: str) -> None:
    print(text, flush=True)


class Demo:
    def __init__(self, workdir: Path, keep: bool) -> None:
        self.workdir = workdir
        self.keep = keep
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env: dict[str, str] = {}
        self.settings: Settings | None = None
        self.idp: AdminClient | None = None
        self.identities: dict[str, str] = {}  # principal -> its AMQP URL (never printed)
        self.registered: list[tuple[str, str]] = []  # ("machines" | "submitters", name)

    # ---- processes ------------------------------------------------------------------------
    def spawn(
        self, name: str, *argv: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, *argv],
            env=env or self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def cli(self, *argv: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "dispatcher", *argv],
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise SystemExit(f"`dispatcher {' '.join(argv)}` failed:\n{result.stderr}")
        return result.stdout

    def register(self) -> None:
        """Each machine and the submitter get their own broker identity, as an operator gives
        them: ``machines register`` / ``submitters register`` (the URLs stay in memory)."""
        for machine in MACHINES:
            self.registered.append(("machines", machine))
            info = json.loads(self.cli("machines", "register", machine, "--json"))
            self.identities[machine] = str(info["amqp_url"])
            say(f"   machine {machine}: broker user {info['username']}")
        self.registered.append(("submitters", SUBMITTER))
        info = json.loads(
            self.cli("submitters", "register", SUBMITTER, "--acts-for", ",".join(OWNERS), "--json")
        )
        self.identities[SUBMITTER] = str(info["amqp_url"])
        owners = ", ".join(OWNERS)
        say(f"   submitter {SUBMITTER}: broker user {info['username']}, acts for {owners}")

    def unregister(self) -> None:
        """Remove the identities registered (even when the demo stopped half way)."""
        for kind, name in reversed(self.registered):
            try:
                self.cli(kind, "unregister", name)
            except SystemExit as exc:
                say(f"   could not unregister {kind[:-1]} {name}: {exc}")
        if self.registered:
            say(f"removed the broker identities of {len(self.registered)} principals")
        self.registered.clear()

    def worker_env(self, machine: str) -> dict[str, str]:
        """A worker's environment: its machine's own identity, the namespace and its timings;
        no Redis, no vault key, no identity provider secret."""
        keep = (
            "RUNDISPATCH_NAMESPACE",
            "RUNDISPATCH_HEARTBEAT_INTERVAL_S",
            "RUNDISPATCH_OFFLINE_AFTER_S",
            "RUNDISPATCH_METRICS_PORT",
            "RUNDISPATCH_LOG_LEVEL",
        )
        env = {k: v for k, v in self.env.items() if not k.startswith("RUNDISPATCH_") or k in keep}
        env["RUNDISPATCH_AMQP_URL"] = self.identities[machine]
        return env

    # ---- the story ------------------------------------------------------------------------
    async def run(self) -> int:
        base = Settings.load()
        namespace = f"demo{uuid.uuid4().hex[:8]}"
        say(f"rundispatch demo — namespace {namespace}, work files in {self.workdir}")
        say("1. starting a local identity provider (HTTPS, Entra-shaped)")
        idp_url, ca_file, client_secret = start_idp(
            self.workdir, self.procs, CLIENT_ID, TOKEN_LIFETIME_S
        )
        self.idp = AdminClient(idp_url, ca_file)
        key = base64.b64encode(os.urandom(32)).decode()
        self.settings = base.model_copy(
            update={
                "namespace": namespace,
                "heartbeat_interval_s": 1.0,
                "offline_after_s": 5.0,
            }
        )
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RUNDISPATCH_")}
        self.env.update(
            RUNDISPATCH_AMQP_URL=base.amqp_url.get_secret_value(),
            RUNDISPATCH_REDIS_URL=base.redis_url.get_secret_value(),
            RUNDISPATCH_NAMESPACE=namespace,
            RUNDISPATCH_SECRET_KEYS=f"demo:{key}",
            RUNDISPATCH_AUTHORITY_HOST=idp_url,
            RUNDISPATCH_CLIENT_ID=CLIENT_ID,
            RUNDISPATCH_CLIENT_SECRET=client_secret,
            RUNDISPATCH_IDP_CA_FILE=ca_file,
            RUNDISPATCH_HEARTBEAT_INTERVAL_S="1",
            RUNDISPATCH_OFFLINE_AFTER_S="5",
            RUNDISPATCH_METRICS_PORT="0",
            RUNDISPATCH_LOG_LEVEL="INFO",
            PYTHONUNBUFFERED="1",
        )
        try:
            return await self.story()
        finally:
            self.stop()
            self.unregister()
            if not self.keep:
                await purge_namespace(self.settings, MACHINES)
                say(f"removed namespace {namespace} (run with --keep to keep it)")

    async def story(self) -> int:
        assert self.settings is not None and self.idp is not None
        fleet_file = self.workdir / "fleet.json"
        fleet_file.write_text(json.dumps(fleet(TENANT), indent=2))
        say("2. applying the example fleet: group finance (3 machines), desk-07, 6 connections")
        say("   " + self.cli("apply", str(fleet_file)).strip())
        say("   registering each machine and the submitter with its own broker identity")
        self.register()
        say("3. signing in connection bob-signin with the device code flow")
        signer = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "dispatcher", "connections", "sign-in", "bob-signin", "--timeout", "60"),
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        code = await self.wait_for_device_code()
        say(f"   the user opens the verification page and enters {code} (done for you)")
        self.idp.call("approve_device_code", user_code=code, username="bob@contoso.com")
        out, _ = await asyncio.wait_for(signer.communicate(), 60)
        if signer.returncode != 0:
            raise SystemExit(f"sign-in failed:\n{out.decode(errors='replace')}")
        say("   " + self.cli("connections", "show", "bob-signin").strip().replace("\n", "\n   "))
        say("4. starting a dispatcher and four machine workers (simulated flows)")
        self.spawn("dispatcher", "-m", "dispatcher", "serve")
        for machine, machine_sessions in sessions(carol="locked").items():
            path = self.workdir / f"sessions-{machine}.json"
            path.write_text(json.dumps(machine_sessions))
            self.spawn(
                f"worker-{machine}",
                "-m",
                "workers",
                "serve",
                "--machine-id",
                machine,
                "--executor",
                "simulate",
                "--sessions-file",
                str(path),
                "--state-dir",
                str(self.workdir / f"state-{machine}"),
                env=self.worker_env(machine),
            )
        submitter = self.settings.model_copy(
            update={"amqp_url": SecretStr(self.identities[SUBMITTER])}
        )
        async with (
            Client.connect(self.settings) as reader,
            worker_broker(submitter, wait_s=30) as broker,
        ):
            # Runs are submitted under the submitter's identity (the broker stamps its user id
            # on each request); their records are read with the operator's.
            return await self.workload(Client(replace(reader.rt, amqp=broker)), reader)

    async def wait_for_device_code(self) -> str:
        assert self.idp is not None
        for _ in range(200):
            codes = self.idp.call("device_codes")
            if codes:
                return str(codes[0])
            await asyncio.sleep(0.1)
        raise SystemExit("the sign-in did not start a device code flow")

    async def workload(self, client: Client, reader: Client) -> int:
        assert self.idp is not None
        say(f"5. submitting a mixed workload over AMQP as submitter {SUBMITTER}")
        self.idp.call("reset_counters")
        ids: dict[str, str] = {}

        async def submit(label: str, **kw: Any) -> str:
            run_id = await client.submit(**kw)
            ids[run_id] = label
            return run_id

        for i in range(48):
            await submit(
                "unattended",
                connection_id=f"fin-svc-{i % 4 + 1}",
                flow_id="post-invoices",
                requested_by="alice@contoso.com",
                mode="unattended",
                inputs={
                    "duration_s": 0.3 + (i % 5) * 0.2,
                    "outcome": "failed" if i % 16 == 7 else "succeeded",
                },
            )
        for i in range(4):
            await submit(
                "high priority",
                connection_id=f"fin-svc-{i + 1}",
                flow_id="urgent-close",
                requested_by="alice@contoso.com",
                mode="unattended",
                priority="high",
                inputs={"duration_s": 0.2},
            )
        await submit(
            "rejected",
            connection_id="fin-svc-1",
            flow_id="post-invoices",
            requested_by="mallory@contoso.com",
            mode="unattended",
        )
        timing_out = await submit(
            "times out",
            connection_id="carol-desk",
            flow_id="reconcile",
            requested_by="carol@contoso.com",
            mode="attended",
            queue_timeout_s=6,
        )
        waiting = await submit(
            "waits for a session",
            connection_id="carol-desk",
            flow_id="reconcile",
            requested_by="carol@contoso.com",
            mode="attended",
            inputs={"duration_s": 0.5},
        )
        say("   52 unattended runs on finance (4 high priority, 3 failing), 1 from a user who")
        say("   does not own the connection, 2 attended runs for carol (her session is locked)")
        started = time.monotonic()
        sign_in_runs = 0
        unlocked = False
        while True:
            elapsed = time.monotonic() - started
            if sign_in_runs < 8 and elapsed >= sign_in_runs * 3:
                await submit(
                    "sign-in",
                    connection_id="bob-signin",
                    flow_id="approve-expenses",
                    requested_by="bob@contoso.com",
                    mode="attended",
                    inputs={"duration_s": 0.3},
                )
                sign_in_runs += 1
            if not unlocked and elapsed >= 9:
                say(f"   [{elapsed:4.1f}s] carol unlocks her session on desk-07")
                desk = sessions(carol="active")["desk-07"]
                (self.workdir / "sessions-desk-07.json").write_text(json.dumps(desk))
                unlocked = True
            runs = [r for r in await reader.rt.runs.get_many(list(ids)) if r is not None]
            counts = Counter(r.status.value for r in runs)
            line = "  ".join(f"{s} {counts[s.value]}" for s in RunStatus if counts[s.value])
            say(f"   [{elapsed:4.1f}s] {line or 'waiting for the dispatcher to record the runs'}")
            if sign_in_runs >= 8 and len(runs) == len(ids) and all(r.status.terminal for r in runs):
                break
            if elapsed > 120:
                say("   giving up after 120 s")
                break
            await asyncio.sleep(1.0)
        summary(
            [r for r in await reader.rt.runs.get_many(list(ids)) if r is not None],
            ids,
            self.idp,
            timing_out=timing_out,
            waiting=waiting,
            namespace=reader.settings.namespace,
            token_lifetime_s=TOKEN_LIFETIME_S,
        )
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the namespace and processes' files afterwards (the processes are stopped)",
    )
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="rundispatch-demo-"))
    demo = Demo(workdir, args.keep)
    try:
        return asyncio.run(demo.run())
    except KeyboardInterrupt:
        demo.stop()
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
