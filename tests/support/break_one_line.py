"""A mutation check of the in-process tests: break one line of a use case, run the tests, put
the line back; every break must make the tests fail ("killed").

    python -m tests.support.break_one_line            # every break, then a table
    python -m tests.support.break_one_line --list     # the breaks, without running anything
    python -m tests.support.break_one_line --only cancel

Each break names its module, the exact line it changes (which must occur once) and what that
line becomes. The file is restored after each run, also on Ctrl-C. Exits 1 if a break
survives, 2 if the tests fail before any break or a break cannot be applied. Not part of
``make test``: it runs the in-process tests once per break (about a minute).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parents[2]
TESTS = ["tests/usecases"]
PYTEST = ["-x", "-q", "-p", "no:cacheprovider", "-o", "timeout=20"]


@dataclass(frozen=True)
class Break:
    """Change the line of ``module`` that reads ``line`` into ``becomes`` (the line must occur
    once, or ``occurrence`` says which one, counting from 0)."""

    module: str
    line: str
    becomes: str
    why: str
    occurrence: int | None = None


BREAKS = (
    # intake
    Break(
        "dispatcher/usecases/intake.py",
        'verdicts[index] = DeadLetter(str(result), "unknown_run")',
        "verdicts[index] = Ack()",
        "a cancel of an unknown run is acked, not dead-lettered",
    ),
    Break(
        "dispatcher/usecases/intake.py",
        "return decision.target",
        "return None",
        "a queued run asks for no placement pass",
    ),
    Break(
        "dispatcher/usecases/intake.py",
        "refresh_token_expires_at=refresh_expiry,",
        "refresh_token_expires_at=None,",
        "a sign-in run may wait past its refresh token",
    ),
    # placement
    Break(
        "dispatcher/usecases/placement.py",
        "if plan.again or lost_races or failed:",
        "if plan.again:",
        "a lost race or a failed hand-off asks for no new pass",
    ),
    Break(
        "dispatcher/usecases/placement.py",
        "await self._fail_queued(window, head.run_id, secret, now)",
        "pass",
        "a run whose secret cannot be had keeps waiting",
    ),
    Break(
        "dispatcher/usecases/placement.py",
        "slots=slots_of(placement.view),",
        "slots=99,",
        "the claim no longer checks the machine's room",
    ),
    Break(
        "dispatcher/usecases/placement.py",
        "sealed_secret=secret,",
        'sealed_secret="",',
        "the assignment carries no secret",
    ),
    # sweeper
    Break(
        "dispatcher/usecases/sweeper.py",
        "if now - self._reachable_since < offline_after:",
        "if False:",
        "machines are judged on heartbeats missed during a store outage",
    ),
    Break(
        "dispatcher/usecases/sweeper.py",
        "if now - since >= self.settings.running_grace_s:",
        "if True:",
        "running runs of an offline machine fail without a grace period",
    ),
    Break(
        "dispatcher/usecases/sweeper.py",
        "self.placer.request(*requeued)",
        "self.placer.request()",
        "runs requeued from a silent machine get no placement pass",
        occurrence=0,
    ),
    Break(
        "dispatcher/usecases/sweeper.py",
        "await self.lifecycle.relay(self.settings.outbox_relay_after_s)",
        "pass",
        "nothing relays what a dead process left in the outbox",
    ),
    # reconcile
    Break(
        "dispatcher/usecases/reconcile.py",
        "if state.fence != fence or state.machine_id != machine:",
        "if state.fence != fence:",
        "a report of another machine repairs the run",
    ),
    Break(
        "dispatcher/usecases/reconcile.py",
        "allowed=(RunStatus.dispatched, RunStatus.running),",
        "allowed=(RunStatus.running,),",
        "an outcome whose start was lost too is not repaired",
    ),
    Break(
        "dispatcher/usecases/reconcile.py",
        "deadline = now + self.settings.max_run_s + self.settings.running_grace_s",
        "deadline = now + self.settings.max_run_s",
        "a repaired start gets no grace before it is failed as overdue",
    ),
    # cancel
    Break(
        "dispatcher/usecases/cancel.py",
        "allowed=(RunStatus.dispatched,),",
        "allowed=(RunStatus.running,),",
        "a dispatched run cannot be cancelled",
    ),
    Break(
        "dispatcher/usecases/cancel.py",
        "result = await window.request_cancel(run, reason=reason, now=now)",
        "result = None",
        "the worker of a running run is never told to stop",
    ),
    Break(
        "dispatcher/usecases/cancel.py",
        "error = RunError(code=ErrorCode.Cancelled, message=reason)",
        'error = RunError(code=ErrorCode.Cancelled, message="cancelled")',
        "the reason given is lost",
    ),
    # the worker
    Break(
        "workers/intake.py",
        "if self.ledger.already_ran(run_id) or run_id in self.runs.running:",
        "if run_id in self.runs.running:",
        "the ledger no longer refuses a run this worker already ran",
    ),
    Break(
        "workers/runner.py",
        "status = RunStatus.cancelled",
        "status = RunStatus.failed",
        "a stopped flow reports failed, not cancelled",
    ),
    Break(
        "workers/reporter.py",
        "self.runs.running.pop(outcome.run_id, None)",
        "pass",
        "a reported run still counts as running",
    ),
    Break(
        "workers/heartbeat.py",
        "running=self.runs.running_refs(),",
        "running=(),",
        "heartbeats no longer list the running runs",
    ),
    Break(
        "workers/worker.py",
        "if isinstance(result, Finished):",
        "if False:",
        "runs cut short by a restart are not marked abandoned in the ledger",
    ),
)


def run_tests() -> tuple[bool, float]:
    """Run the in-process tests; True when they pass."""
    began = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", *TESTS, *PYTEST],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    return completed.returncode == 0, time.monotonic() - began


def apply(item: Break) -> tuple[Path, str, int]:
    """Break the line; returns the file, its original text and the line's number."""
    path = REPO / item.module
    original = path.read_text(encoding="utf-8")
    lines = original.splitlines(keepends=True)
    found = [i for i, line in enumerate(lines) if line.strip() == item.line]
    wanted = 0 if item.occurrence is None else item.occurrence
    if (len(found) != 1 and item.occurrence is None) or len(found) <= wanted:
        raise SystemExit(f"{item.module}: {item.line!r} occurs {len(found)} times")
    index = found[wanted]
    indent = lines[index][: len(lines[index]) - len(lines[index].lstrip())]
    lines[index] = f"{indent}{item.becomes}\n"
    broken = "".join(lines)
    compile(broken, str(path), "exec")  # a break must still be Python
    path.write_text(broken, encoding="utf-8")
    return path, original, index + 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.break_one_line", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--list", action="store_true", help="show the breaks, run nothing")
    parser.add_argument("--only", default="", help="only the breaks of modules containing this")
    args = parser.parse_args(argv)
    breaks = [b for b in BREAKS if args.only in b.module]
    if args.list:
        for item in breaks:
            print(f"{item.module}: {item.line}  ->  {item.becomes}   ({item.why})")
        return 0
    passed, seconds = run_tests()
    if not passed:
        print("the in-process tests fail without any break: fix them first", file=sys.stderr)
        return 2
    print(f"unbroken: the tests pass ({seconds:.1f} s); {len(breaks)} breaks to try\n")
    restore: list[tuple[Path, str]] = []

    def interrupted(signum: int, frame: FrameType | None) -> None:
        for path, text in restore:
            path.write_text(text, encoding="utf-8")
        raise SystemExit(130)

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    rows = []
    for item in breaks:
        path, original, number = apply(item)
        restore[:] = [(path, original)]
        try:
            passed, seconds = run_tests()
        finally:
            path.write_text(original, encoding="utf-8")
            restore.clear()
        rows.append((item, number, not passed, seconds))
        print(f"  {'killed  ' if not passed else 'SURVIVED'} {item.module}:{number}  {item.why}")
    survivors = [row for row in rows if not row[2]]
    print(f"\n{'module':<36} {'line':>5}  {'killed':<7} break")
    for item, number, killed, _ in rows:
        verdict = "yes" if killed else "NO"
        print(f"{item.module:<36} {number:>5}  {verdict:<7} {item.line} -> {item.becomes}")
    print(f"\n{len(rows) - len(survivors)} of {len(rows)} breaks killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    raise SystemExit(main())
