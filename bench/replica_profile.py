"""Where a second dispatcher replica's CPU goes: py-spy samples of the ``replicas`` section's
drains, one and two dispatcher processes, summed per kind of drain.

    .venv/bin/python -m bench.replica_profile [--reps 3] [--out DIR]

Runs ``python -m bench --only replicas`` (through ``deploy/local/services.py``, as ``make bench``
does), records every drain's dispatcher processes for ``--seconds`` once they have run for
``--settle`` seconds, and prints, for the drains with one and with two processes, the samples
per second of drain and the share of the samples in the frames that differ most (socket writes
of aiormq and of redis-py, placement passes, the consumers). Needs ``py-spy`` in the virtual
environment (``.venv/bin/pip install py-spy``). Results: bench/README.md, "Where the second
replica's CPU goes".
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY_SPY = Path(sys.executable).with_name("py-spy")
SERVE = b"-m\x00dispatcher\x00serve"

# (label, what a sample's stack must hold, what its innermost frame must hold)
ROWS = (
    ("socket writes, aiormq", "aiormq/connection.py", "_SelectorSocketTransport.write"),
    ("socket writes, redis-py", "redis/asyncio", "_SelectorSocketTransport.write"),
    ("placement passes", "_pass (dispatcher/usecases/placement.py", ""),
    ("worker requests (start, finish)", "handle (dispatcher/usecases/worker_link.py", ""),
    ("signals (terminal events)", "handle_signals", ""),
    ("intake", "handle (dispatcher/usecases/intake.py", ""),
    ("foresight chore", "run_forever (dispatcher/usecases/foresight.py", ""),
    ("epoll (waiting, as seen by a non-blocking sampler)", "", "EpollSelector.select"),
)


def dispatcher_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if SERVE in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return sorted(pids)


def record(pids: list[int], out: Path, seconds: int, index: int) -> None:
    spies = []
    for pid in pids:
        target = out / f"n{len(pids)}-{index}-{pid}.txt"
        argv = [str(PY_SPY), "record", "--nonblocking", "-r", "250", "-d", str(seconds)]
        argv += ["-f", "raw", "-o", str(target), "-p", str(pid)]
        spies.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for spy in spies:
        spy.wait()


def summary(out: Path, seconds: float) -> str:
    lines = []
    for n in (1, 2):
        files = [f for f in out.glob(f"n{n}-*.txt") if f.stat().st_size > 5000]
        drains = len({f.name.split("-")[1] for f in files})
        total, hits = 0, collections.Counter[str]()
        for path in files:
            for line in path.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                if not stack:
                    continue
                samples = int(count)
                total += samples
                inner = stack.rsplit(";", 1)[-1]
                for label, holds, innermost in ROWS:
                    if holds in stack and innermost in inner:
                        hits[label] += samples
        if not total:
            lines.append(f"{n} process(es): no samples")
            continue
        per_s = total / max(1, drains) / seconds
        lines.append(f"{n} process(es): {drains} drains, {per_s:.0f} samples/s of drain (all)")
        for label, _, _ in ROWS:
            lines.append(f"  {label:52s} {100 * hits[label] / total:5.1f} %")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="pairs of drains (default 3)")
    parser.add_argument("--seconds", type=int, default=3, help="recorded per drain (whole seconds)")
    parser.add_argument("--settle", type=float, default=1.2, help="seconds waited after a start")
    parser.add_argument("--out", type=Path, help="where the samples go (default: a temp dir)")
    args = parser.parse_args()
    if not PY_SPY.exists():
        print(f"{PY_SPY} not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="replica-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "deploy/local/services.py", "--", sys.executable, "-m", "bench"]
    argv += ["--only", "replicas", "--reps", str(args.reps), "--output", str(out / "bench.json")]
    bench = subprocess.Popen(argv, cwd=REPO)
    seen: list[int] = []
    index = 0
    while bench.poll() is None:
        pids = dispatcher_pids()
        if pids and pids != seen:
            seen = pids
            time.sleep(args.settle)
            index += 1
            record(pids, out, args.seconds, index)
            print(f"recorded drain {index}: {len(pids)} dispatcher process(es)", file=sys.stderr)
        time.sleep(0.1)
    print(summary(out, args.seconds))
    print(f"(samples in {out})")
    return bench.returncode


if __name__ == "__main__":
    sys.exit(main())
