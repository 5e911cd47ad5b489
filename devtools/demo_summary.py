"""The demo's identity provider process and its closing summary (``devtools.demo``)."""

from __future__ import annotations

import base64
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from devtools.server import AdminClient
from dispatcher.models import Run, RunStatus


def say(text: str) -> None:
    print(text, flush=True)


def start_idp(
    workdir: Path, procs: list[subprocess.Popen[bytes]], client_id: str, lifetime_s: int
) -> tuple[str, str, str]:
    """Start the local identity provider; its URL, CA file and the client secret."""
    secret = base64.urlsafe_b64encode(os.urandom(24)).decode()
    out = workdir / "idp.out"
    with out.open("wb") as handle:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "devtools.idp",
                "--port",
                "0",
                "--cert-dir",
                str(workdir / "certs"),
                "--client-id",
                client_id,
                "--client-secret",
                secret,
                "--access-token-lifetime",
                str(lifetime_s),
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    procs.append(proc)
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


def summary(
    runs: list[Run],
    labels: dict[str, str],
    idp: AdminClient,
    *,
    timing_out: str,
    waiting: str,
    namespace: str,
    token_lifetime_s: int,
) -> None:
    """Print what happened to the workload: statuses, machines, errors, waits, the sign-in
    connection's token refreshes, priority and the two attended runs for carol."""
    ids = labels
    say("\nsummary")
    by_status = Counter(r.status.value for r in runs)
    say("  runs by status:   " + ", ".join(f"{k} {v}" for k, v in sorted(by_status.items())))
    by_machine = Counter(r.machine_id for r in runs if r.machine_id)
    say("  runs by machine:  " + ", ".join(f"{k} {v}" for k, v in sorted(by_machine.items())))
    codes = Counter(r.error.code.value for r in runs if r.error)
    say("  error codes:      " + ", ".join(f"{k} {v}" for k, v in sorted(codes.items())))
    waits = sorted(
        (r.dispatched_at - (r.submitted_at or r.queued_at or 0)) for r in runs if r.dispatched_at
    )
    if waits:
        p95 = waits[min(len(waits) - 1, int(len(waits) * 0.95))]
        say(f"  queue wait:       p50 {statistics.median(waits):.2f} s, p95 {p95:.2f} s")
    token_requests = idp.call("counters").get("token", 0)
    sign_in_ok = sum(
        1 for r in runs if ids[r.run_id] == "sign-in" and r.status is RunStatus.succeeded
    )
    say(
        f"  sign-in runs:     {sign_in_ok} succeeded; identity provider token requests "
        f"during the workload: {token_requests} (access tokens live {token_lifetime_s} s, "
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
        f"{namespace} and --keep)"
    )
