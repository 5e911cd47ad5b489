"""Drains of the minimal baseline and of the raw loop, with their CPU per message.

A :class:`Rig` owns one namespace (its queues, keys and child processes) and deletes all of
it in :meth:`Rig.close`. A drain pre-fills ``runs`` requests with nothing consuming them,
waits (at most 6 s) for a quiet machine, starts the consuming process and polls progress
every 100 ms with a CPU sample of every process on the path; the rate and the CPU per
message are taken between the moments 10 % and 90 % of the messages were done (start-up and
tail left out), as in ``bench/README.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiormq
import redis.asyncio as aioredis

from bench.minimal import amqp
from bench.minimal.names import MinimalNames, amqp_url, new_namespace, redis_url
from bench.procfs import (
    CpuSample,
    cpu_seconds,
    machine_load,
    pid_listening_on,
    sample,
    wait_quiet,
)
from bench.stats import percentile

REPO = Path(__file__).resolve().parents[2]
POLL_S = 0.1


@dataclass(frozen=True)
class MinimalConfig:
    """One configuration of the minimal hand-off (each attempt in bench/README.md is one)."""

    machines: int = 8
    worker_procs: int = 8  # the machines are split over this many worker processes
    queues: str = "quorum"
    d_batch: int = 100
    d_prefetch: int = 400
    d_depth: int = 2
    d_consumers: int = 1
    d_connections: int = 1
    w_batch: int = 50
    w_prefetch: int = 100
    w_depth: int = 2
    publish: str = "frames"  # a confirm window as one frame write; "aiormq": basic_publish


@dataclass(frozen=True)
class StackConfig:
    queues: str = "quorum"
    batch: int = 100
    prefetch: int = 200
    depth: int = 1
    redis: bool = True
    client: str = "aiormq"  # or "aio-pika": the reference's publish path
    publish: str = "aiormq"  # basic_publish per message; "frames": one write per window


@dataclass
class Children:
    """Child processes, each in its own session, stopped by their own pid only."""

    workdir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.minimal", *argv],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    async def ready(self, names: Sequence[str], timeout: float = 30.0) -> None:
        """Until each process has printed ``ready`` (connected, consuming)."""
        deadline = time.monotonic() + timeout
        for name in names:
            while "ready" not in (self.workdir / f"{name}.log").read_text(errors="replace"):
                proc = self.procs[name]
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start:\n{self.tail(name)}")
                await asyncio.sleep(0.05)

    def tail(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self, prefix: str = "") -> None:
        for name in [n for n in self.procs if n.startswith(prefix)]:
            self.stop(name)

    def pids(self, prefix: str) -> list[int]:
        return [p.pid for n, p in self.procs.items() if n.startswith(prefix)]


def request_body(run_id: str, i: int) -> bytes:
    """The shape and size of a run request (~250 B of JSON), built without the product."""
    return (
        b'{"run_id":"%s","flow_id":"bench-flow","connection_id":"c-live-%d",'
        b'"requested_by":"bench@contoso.com","mode":"unattended","priority":"normal",'
        b'"inputs":{"duration_s":0},"submitted_at":%r}' % (run_id.encode(), i % 10, time.time())
    )


class Rig:
    def __init__(self, ns: str | None = None, log: Callable[[str], None] = print) -> None:
        self.names = MinimalNames(ns or new_namespace())
        self.log = log
        self.workdir = Path(tempfile.mkdtemp(prefix="rundispatch-minimal-"))
        self.children = Children(self.workdir)
        self.redis = aioredis.Redis.from_url(redis_url())
        self.connection: aiormq.abc.AbstractConnection | None = None
        self.channel: aiormq.abc.AbstractChannel | None = None
        self.rabbit_pid = pid_listening_on(urlparse(amqp_url()).port or 5672)
        self.redis_pid = pid_listening_on(urlparse(redis_url()).port or 6379)
        self.declared: dict[str, str] = {}  # queue -> type
        self.workers_for: MinimalConfig | None = None
        self.drains = 0

    async def open(self) -> None:
        self.connection = await aiormq.connect(amqp_url())
        self.channel = await amqp.open_channel(self.connection)

    async def declare(self, queues: Sequence[str], kind: str) -> None:
        """Declare ``queues`` as ``kind``; one declared before with another type is deleted
        and declared again."""
        assert self.channel is not None
        for queue in queues:
            if self.declared.get(queue) == kind:
                continue
            if queue in self.declared:
                await self.channel.queue_delete(queue)
            await self.channel.queue_declare(
                queue, durable=True, arguments=amqp.queue_arguments(kind)
            )
            self.declared[queue] = kind

    async def depth(self, queue: str) -> int:
        assert self.channel is not None
        ok = await self.channel.queue_declare(queue, passive=True)
        return int(ok.message_count or 0)

    async def prefill(self, queue: str, count: int, prefix: str, window: int = 1000) -> float:
        """Publish ``count`` persistent requests to ``queue``, confirmed by windows (each one
        frame write: the pre-fill is not measured, only its time is); seconds."""
        assert self.channel is not None
        began = time.perf_counter()
        for start in range(0, count, window):
            batch = []
            for i in range(start, min(count, start + window)):
                run_id = f"{prefix}{i}"
                batch.append((queue, request_body(run_id, i), amqp.properties(run_id)))
            await amqp.publish_frames(self.channel, batch)
        return time.perf_counter() - began

    async def forget_runs(self) -> None:
        """Delete the runs' keys between drains (the namespace stays)."""
        batch: list[bytes] = []
        async for key in self.redis.scan_iter(match=self.names.pattern, count=2000):
            batch.append(key)
            if len(batch) >= 2000:
                await self.redis.unlink(*batch)
                batch = []
        if batch:
            await self.redis.unlink(*batch)

    async def close(self, keep_logs: bool = False) -> dict[str, int]:
        """Stop every child, delete every queue and key of the namespace and the process logs
        (kept with ``keep_logs``, after a failure); what was left."""
        self.children.stop_all()
        if not keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)
        deleted = 0
        if self.channel is not None:
            for queue in list(self.declared):
                with contextlib.suppress(Exception):
                    await self.channel.queue_delete(queue)
                    deleted += 1
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.connection.close()
        await self.forget_runs()
        left = len([k async for k in self.redis.scan_iter(match=self.names.pattern)])
        await self.redis.aclose()
        return {"queues_deleted": deleted, "redis_keys_left": left}

    # ---- measuring a drain ------------------------------------------------------------------
    async def measure(
        self,
        count: int,
        done: Callable[[], Awaitable[int]],
        groups: dict[str, list[int]],
        timeout: float,
    ) -> dict[str, Any]:
        """Poll ``done()`` until ``count``; rate and CPU between the 10 % and 90 % marks."""
        extra = [p for p in (self.rabbit_pid, self.redis_pid) if p]
        ours = [p for pids in groups.values() for p in pids] + [os.getpid()]
        points: list[tuple[int, CpuSample]] = []
        began = time.monotonic()
        while True:
            n = await done()
            points.append((n, sample([*ours, *extra])))
            if n >= count:
                break
            if time.monotonic() - began > timeout:
                raise RuntimeError(f"drain stalled at {n} of {count}")
            await asyncio.sleep(POLL_S)
        n0, first = _at_mark(points, 0.1 * count)
        n1, last = _at_mark(points, 0.9 * count)
        span = max(1e-9, last.at - first.at)
        moved = max(1, n1 - n0)
        busy, steal = machine_load(first, last)
        result: dict[str, Any] = {"rate": round(moved / span, 1), "window_s": round(span, 2)}
        cpu_groups = {**groups, "rabbit": [self.rabbit_pid or -1], "redis": [self.redis_pid or -1]}
        accounted = 0.0
        for group, pids in cpu_groups.items():
            used = cpu_seconds(first, last, pids)
            accounted += used
            result[f"{group}_cores"] = round(used / span, 3)
            result[f"{group}_us_per_msg"] = round(used / moved * 1e6)
        runner = cpu_seconds(first, last, [os.getpid()])
        result["runner_cores"] = round(runner / span, 3)
        result["machine_busy"] = round(busy, 2)
        result["steal"] = round(steal, 3)
        result["others_cores"] = round(max(0.0, busy - (accounted + runner) / span), 2)
        return result

    # ---- the minimal hand-off ----------------------------------------------------------------
    async def ensure_workers(self, cfg: MinimalConfig) -> None:
        same = self.workers_for is not None and (
            (self.workers_for.machines, self.workers_for.worker_procs, self.workers_for.queues)
            == (cfg.machines, cfg.worker_procs, cfg.queues)
            and (self.workers_for.w_batch, self.workers_for.w_prefetch, self.workers_for.w_depth)
            == (cfg.w_batch, cfg.w_prefetch, cfg.w_depth)
            and self.workers_for.publish == cfg.publish
        )
        if same:
            return
        self.children.stop_all("worker-")
        names = self.names
        await self.declare(
            [names.requests, names.outcomes]
            + [names.machine_queue(str(m)) for m in range(cfg.machines)],
            cfg.queues,
        )
        started = []
        for index in range(cfg.worker_procs):
            machines = [str(m) for m in range(index, cfg.machines, cfg.worker_procs)]
            name = f"worker-{index}"
            argv = ["worker", "--ns", names.ns, "--machines", ",".join(machines)]
            argv += ["--batch", str(cfg.w_batch), "--prefetch", str(cfg.w_prefetch)]
            argv += ["--depth", str(cfg.w_depth), "--publish", cfg.publish]
            self.children.start(name, argv)
            started.append(name)
        await self.children.ready(started)
        self.workers_for = cfg

    async def drain_minimal(self, cfg: MinimalConfig, runs: int, label: str) -> dict[str, Any]:
        await self.ensure_workers(cfg)
        await self.forget_runs()
        self.drains += 1
        fill_s = await self.prefill(self.names.requests, runs, f"{label}-{self.drains}-")
        quiet = await wait_quiet()
        name = f"dispatcher-{self.drains}"
        argv = ["dispatcher", "--ns", self.names.ns, "--machines", str(cfg.machines)]
        argv += ["--batch", str(cfg.d_batch), "--prefetch", str(cfg.d_prefetch)]
        argv += ["--depth", str(cfg.d_depth), "--consumers", str(cfg.d_consumers)]
        argv += ["--connections", str(cfg.d_connections), "--publish", cfg.publish]
        self.children.start(name, argv)
        finished = self.names.finished
        try:
            result = await self.measure(
                runs,
                lambda: self.redis.zcard(finished),  # type: ignore[arg-type,return-value]
                {"dispatcher": self.children.pids(name), "worker": self.children.pids("worker-")},
                timeout=max(60.0, runs / 20),
            )
            await asyncio.sleep(0.3)  # the last outcomes' acks
            outcomes_left = await self.depth(self.names.outcomes)
        finally:
            self.children.stop(name)
        scores = await self.redis.zrange(finished, 0, -1, withscores=True)
        latency = [float(s) for _, s in scores]
        result |= {
            "label": label,
            "runs": runs,
            "busy_before": round(quiet, 2),
            "prefill_s": round(fill_s, 2),
            "latency_p50_ms": round(percentile(latency, 50), 1),
            "latency_p99_ms": round(percentile(latency, 99), 1),
            "latency_max_ms": round(max(latency, default=float("nan")), 1),
            "outcomes_left": outcomes_left,
            "config": asdict(cfg),
        }
        result["cpu_us_per_run"] = sum(
            result[f"{g}_us_per_msg"] for g in ("dispatcher", "worker", "rabbit", "redis")
        )
        self.log(
            f"  minimal {label:<14} {result['rate']:>7.1f} runs/s  dispatcher "
            f"{result['dispatcher_us_per_msg']} µs/run ({result['dispatcher_cores']:.2f} cores)"
            f"  workers {result['worker_us_per_msg']} ({result['worker_cores']:.2f})  rabbit "
            f"{result['rabbit_us_per_msg']} ({result['rabbit_cores']:.2f})  p50/p99 "
            f"{result['latency_p50_ms']}/{result['latency_p99_ms']} ms  busy "
            f"{result['machine_busy']:.2f} others {result['others_cores']:.2f}"
        )
        return result

    # ---- the raw loop ------------------------------------------------------------------------
    async def drain_stack(self, cfg: StackConfig, messages: int, label: str) -> dict[str, Any]:
        names = self.names
        await self.declare([names.stack_in, names.stack_out], cfg.queues)
        assert self.channel is not None
        await self.channel.queue_purge(names.stack_out)
        pipe = self.redis.pipeline(transaction=False)
        for i in range(10):
            pipe.set(names.key(f"s:conn:{i}"), "x" * 300)
        for i in range(8):
            pipe.set(names.key(f"s:machine:{i}"), "y" * 300)
        await pipe.execute()
        self.drains += 1
        fill_s = await self.prefill(names.stack_in, messages, f"{label}-{self.drains}-")
        quiet = await wait_quiet()
        name = f"stack-{self.drains}"
        argv = ["stack-loop", "--ns", names.ns, "--batch", str(cfg.batch)]
        argv += ["--prefetch", str(cfg.prefetch), "--depth", str(cfg.depth)]
        argv += [] if cfg.redis else ["--no-redis"]
        argv += ["--client", cfg.client, "--publish", cfg.publish]
        self.children.start(name, argv)
        try:
            result = await self.measure(
                messages,
                lambda: self.depth(names.stack_out),
                {"loop": self.children.pids(name)},
                timeout=max(60.0, messages / 50),
            )
        finally:
            self.children.stop(name)
            await self.channel.queue_purge(names.stack_out)
            await self.forget_runs()
        result |= {
            "label": label,
            "messages": messages,
            "busy_before": round(quiet, 2),
            "prefill_s": round(fill_s, 2),
            "config": asdict(cfg),
        }
        self.log(
            f"  stack {label:<16} {result['rate']:>7.1f} msgs/s  loop "
            f"{result['loop_us_per_msg']} µs/msg ({result['loop_cores']:.2f} cores)  rabbit "
            f"{result['rabbit_us_per_msg']} ({result['rabbit_cores']:.2f})  redis "
            f"{result['redis_us_per_msg']}  busy {result['machine_busy']:.2f} others "
            f"{result['others_cores']:.2f}"
        )
        return result


def _at_mark(points: list[tuple[int, CpuSample]], mark: float) -> tuple[int, CpuSample]:
    for count, snap in points:
        if count >= mark:
            return count, snap
    return points[-1]
