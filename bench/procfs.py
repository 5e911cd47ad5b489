"""CPU and load accounting from ``/proc``, and the quiet-machine wait.

Imports nothing of the product, so the independent minimal baseline (``bench/minimal``) uses
it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, hwm


def machine_times() -> tuple[float, float, float]:
    """(busy, steal, total) CPU seconds of the whole machine since boot."""
    with open("/proc/stat", encoding="ascii") as handle:
        parts = [int(x) for x in handle.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (parts + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq
    return busy / CLK_TCK, steal / CLK_TCK, (busy + idle + iowait + steal) / CLK_TCK


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as handle:
            next(handle)
            for line in handle:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(cols[9])
    return inodes


def pid_listening_on(port: int) -> int | None:
    """The process listening on a local TCP port (RabbitMQ, Redis), for CPU accounting."""
    inodes = {f"socket:[{i}]" for i in _listening_inodes(port)}
    if not inodes:
        return None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                        return int(entry)
    return None


@dataclass
class CpuSample:
    at: float
    per_pid: dict[int, float]
    busy: float
    steal: float


def sample(pids: Iterable[int]) -> CpuSample:
    busy, steal, _ = machine_times()
    return CpuSample(time.monotonic(), {p: proc_cpu(p) for p in pids}, busy, steal)


def cpu_seconds(first: CpuSample, last: CpuSample, pids: Iterable[int]) -> float:
    """CPU seconds used by ``pids`` between two samples."""
    return sum(last.per_pid.get(p, 0.0) - first.per_pid.get(p, 0.0) for p in pids)


def cores(first: CpuSample, last: CpuSample, pids: Iterable[int]) -> float:
    """Cores used by ``pids`` between two samples (1.0 = one core busy)."""
    return cpu_seconds(first, last, pids) / max(1e-9, last.at - first.at)


def machine_load(first: CpuSample, last: CpuSample) -> tuple[float, float]:
    span = max(1e-9, last.at - first.at)
    return (last.busy - first.busy) / span, (last.steal - first.steal) / span


async def wait_quiet(max_wait_s: float = 6.0, threshold: float = 0.3) -> float:
    """Wait (at most ``max_wait_s``) until the machine is below ``threshold`` busy cores;
    return the busy cores seen last (the run goes on anyway when the machine stays busy)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy0, _, _ = machine_times()
        await asyncio.sleep(1.0)
        busy1, _, _ = machine_times()
        load = busy1 - busy0
        if load < threshold or time.monotonic() >= deadline:
            return load
