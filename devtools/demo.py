"""``make demo`` / ``python -m devtools.demo``: the product end to end on this machine.

Starts a local identity provider, applies an example fleet, signs a "connect with sign-in"
connection in with the device code flow, starts a dispatcher and four simulated machine
workers, submits a mixed workload (unattended and attended runs, high priority, failures, a
rejection, a run that waits for a locked session and times out, a sign-in connection whose
access token is refreshed while the demo runs), shows live progress and ends with a summary.
Everything lives in a private namespace, removed at the end (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from devtools.server import AdminClient
from dispatcher.bootstrap import purge_namespace
from dispatcher.client import Client
from dispatcher.models import Run, RunStatus
from dispatcher.settings import Settings

TENANT = "11111111-2222-3333-4444-555555555555"
CLIENT_ID = "rundispatch-demo"
MACHINES = ["fin-01", "fin-02", "fin-03", "desk-07"]
TOKEN_LIFETIME_S = 310  # msal refreshes a token with < 5 min left: a refresh every ~10 s


def say(text: str) -> None:
    print(text, flush=True)


def fleet(tenant: str) -> dict[str, Any]:
    group = "finance"
    return {
        "environment": {"tenant_id": tenant},
        "groups": [{"group_id": group, "name": "Finance bots"}],
        "machines": [
            {
                "machine_id": "fin-01",
                "name": "FIN-01",
                "group_id": group,
                "os": "windows_server",
                "join_type": "entra_joined",
                "max_unattended_runs": 3,
            },
            {
                "machine_id": "fin-02",
                "name": "FIN-02",
                "group_id": group,
                "os": "windows_server",
                "join_type": "hybrid_joined",
                "max_unattended_runs": 3,
            },
            {
                "machine_id": "fin-03",
                "name": "FIN-03",
                "group_id": group,
                "os": "windows_client",
                "join_type": "entra_joined",
            },
            {
                "machine_id": "desk-07",
                "name": "DESK-07",
                "os": "windows_client",
                "join_type": "ad_joined",
                "allowed_registration_tenants": [tenant],
            },
        ],
        "connections": [
            *(
                {
                    "connection_id": f"fin-svc-{i}",
                    "owner": "alice@contoso.com",
                    "kind": "credentials",
                    "target": {"group_id": group},
                    "username": f"CONTOSO\\svc-fin{i}",
                    "password": f"demo-password-{i}",
                }
                for i in range(1, 5)
            ),
            {
                "connection_id": "carol-desk",
                "owner": "carol@contoso.com",
                "kind": "credentials",
                "target": {"machine_id": "desk-07"},
                "username": "CONTOSO\\carol",
                "password": "demo-password-carol",
            },
            {
                "connection_id": "bob-signin",
                "owner": "bob@contoso.com",
                "kind": "sign_in",
                "target": {"machine_id": "desk-07"},
                "account": "bob@contoso.com",
                "tenant_id": tenant,
            },
        ],
    }


class Demo:
    def __init__(self, workdir: Path, keep: bool) -> None:
        self.workdir = workdir
        self.keep = keep
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env: dict[str, str] = {}
        self.settings: Settings | None = None
        self.idp: AdminClient | None = None

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

    def start_idp(self) -> tuple[str, str, str]:
        secret = base64.urlsafe_b64encode(os.urandom(24)).decode()
        out = self.workdir / "idp.out"
        with out.open("wb") as handle:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "devtools.idp",
                    "--port",
                    "0",
                    "--cert-dir",
                    str(self.workdir / "certs"),
                    "--client-id",
                    CLIENT_ID,
                    "--client-secret",
                    secret,
                    "--access-token-lifetime",
                    str(TOKEN_LIFETIME_S),
                ],
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for line in out.read_text().splitlines():
                if line.startswith("{"):
                    info = json.loads(line)
                    return str(info["url"]), str(info["ca_file"]), secret
            if proc.poll() is not None:
                raise SystemExit(f"the identity provider stopped:\n{out.read_text()}")
            time.sleep(0.1)
        raise SystemExit("the identity provider did not start")

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

    # ---- the story ------------------------------------------------------------------------
    async def run(self) -> int:
        base = Settings.load()
        namespace = f"demo{uuid.uuid4().hex[:8]}"
        say(f"rundispatch demo — namespace {namespace}, work files in {self.workdir}")
        say("1. starting a local identity provider (HTTPS, Entra-shaped)")
        idp_url, ca_file, client_secret = self.start_idp()
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
            if not self.keep:
                await purge_namespace(self.settings, MACHINES)
                say(f"removed namespace {namespace} (run with --keep to keep it)")

    async def story(self) -> int:
        assert self.settings is not None and self.idp is not None
        fleet_file = self.workdir / "fleet.json"
        fleet_file.write_text(json.dumps(fleet(TENANT), indent=2))
        say("2. applying the example fleet: group finance (3 machines), desk-07, 6 connections")
        say("   " + self.cli("apply", str(fleet_file)).strip())
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
        sessions = {
            "fin-01": [],
            "fin-02": [],
            "fin-03": [],
            "desk-07": [
                {"user": "bob@contoso.com", "state": "active"},
                {"user": "CONTOSO\\carol", "state": "locked"},
            ],
        }
        for machine, machine_sessions in sessions.items():
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
            )
        async with Client.connect(self.settings) as client:
            return await self.workload(client)

    async def wait_for_device_code(self) -> str:
        assert self.idp is not None
        for _ in range(200):
            codes = self.idp.call("device_codes")
            if codes:
                return str(codes[0])
            await asyncio.sleep(0.1)
        raise SystemExit("the sign-in did not start a device code flow")

    async def workload(self, client: Client) -> int:
        assert self.idp is not None
        say("5. submitting a mixed workload over AMQP")
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
                (self.workdir / "sessions-desk-07.json").write_text(
                    json.dumps(
                        [
                            {"user": "bob@contoso.com", "state": "active"},
                            {"user": "CONTOSO\\carol", "state": "active"},
                        ]
                    )
                )
                unlocked = True
            runs = [r for r in await client.rt.runs.get_many(list(ids)) if r is not None]
            counts = Counter(r.status.value for r in runs)
            line = "  ".join(f"{s} {counts[s.value]}" for s in RunStatus if counts[s.value])
            say(f"   [{elapsed:4.1f}s] {line or 'waiting for the dispatcher to record the runs'}")
            if sign_in_runs >= 8 and len(runs) == len(ids) and all(r.status.terminal for r in runs):
                break
            if elapsed > 120:
                say("   giving up after 120 s")
                break
            await asyncio.sleep(1.0)
        await self.summary(client, ids, timing_out, waiting)
        return 0

    async def summary(
        self, client: Client, ids: dict[str, str], timing_out: str, waiting: str
    ) -> None:
        assert self.idp is not None
        runs: list[Run] = [r for r in await client.rt.runs.get_many(list(ids)) if r is not None]
        say("\nsummary")
        by_status = Counter(r.status.value for r in runs)
        say("  runs by status:   " + ", ".join(f"{k} {v}" for k, v in sorted(by_status.items())))
        by_machine = Counter(r.machine_id for r in runs if r.machine_id)
        say("  runs by machine:  " + ", ".join(f"{k} {v}" for k, v in sorted(by_machine.items())))
        codes = Counter(r.error.code.value for r in runs if r.error)
        say("  error codes:      " + ", ".join(f"{k} {v}" for k, v in sorted(codes.items())))
        waits = sorted(
            (r.dispatched_at - (r.submitted_at or r.queued_at or 0))
            for r in runs
            if r.dispatched_at
        )
        if waits:
            p95 = waits[min(len(waits) - 1, int(len(waits) * 0.95))]
            say(f"  queue wait:       p50 {statistics.median(waits):.2f} s, p95 {p95:.2f} s")
        token_requests = self.idp.call("counters").get("token", 0)
        sign_in_ok = sum(
            1 for r in runs if ids[r.run_id] == "sign-in" and r.status is RunStatus.succeeded
        )
        say(
            f"  sign-in runs:     {sign_in_ok} succeeded; identity provider token requests "
            f"during the workload: {token_requests} (access tokens live {TOKEN_LIFETIME_S} s, "
            "refreshed when < 5 min are left)"
        )
        first_high = min((r.started_at or 1e18) for r in runs if ids[r.run_id] == "high priority")
        later_normal = sum(
            1 for r in runs if ids[r.run_id] == "unattended" and (r.started_at or 0) > first_high
        )
        say(
            f"  priority:         the first high-priority run started ahead of {later_normal} "
            "earlier normal runs"
        )
        timed = next(r for r in runs if r.run_id == timing_out)
        reasons = (timed.error.detail or {}).get("reasons") if timed.error else None
        say(
            f"  {timing_out[:12]}…  {timed.status.value}"
            f" ({timed.error.code.value if timed.error else '-'}): {reasons}"
        )
        other = next(r for r in runs if r.run_id == waiting)
        waited = (other.started_at or 0) - (other.queued_at or 0)
        say(
            f"  {waiting[:12]}…  {other.status.value} after waiting {waited:.1f} s for the "
            "session to become active"
        )
        say(
            f"\n  try: python -m dispatcher runs show {timing_out}   (with RUNDISPATCH_NAMESPACE="
            f"{client.settings.namespace} and --keep)"
        )


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
