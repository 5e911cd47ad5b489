"""The scenarios: drains (throughput), paced runs (latency), scale, replicas, memory, profile.

One :class:`Bench` owns the namespace, the child processes and the connections of a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aio_pika
import redis.asyncio as aioredis
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from bench import baseline as bl
from bench.env import REPO, Procs, cleanup, delete_queues, new_settings, settings_env
from bench.fleet import (
    LIVE_CONNECTIONS,
    LIVE_SLOTS,
    OWNER,
    fleet_document,
    forget_machines,
    idle_ids,
    insert_waiting,
    live_ids,
    queued_run_bytes,
    record_heartbeats,
    static_heartbeat,
)
from bench.procfs import (
    CpuSample,
    cores,
    cpu_seconds,
    machine_load,
    pid_listening_on,
    proc_rss,
    sample,
    wait_quiet,
)
from bench.producer import prefill
from dispatcher.adapters.amqp.consumers import read_consumers
from dispatcher.adapters.amqp.identities import vhost_of
from dispatcher.adapters.amqp.migrate import delete_if_empty
from dispatcher.adapters.amqp.topology import consumed_queues, run_queue_bindings
from dispatcher.adapters.redis.machines import RedisMachines
from dispatcher.core.principals import admin_user_of
from dispatcher.names import Names, event_binding, event_of
from dispatcher.settings import Settings

POLL_S = 0.1
# A dispatcher serving before its drain has settled when it uses less than this over SETTLE_S.
SETTLE_S = 1.0
SETTLED_CORES = 0.1


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def at_mark(points: list[tuple[int, CpuSample]], mark: float) -> tuple[int, CpuSample]:
    """The first poll at which at least ``mark`` runs had succeeded."""
    for count, snap in points:
        if count >= mark:
            return count, snap
    return points[-1]


class Bench:
    def __init__(self, *, live: int, fleet_small: int, log: Any) -> None:
        self.settings: Settings = new_settings()
        self.names = Names(self.settings.namespace)
        self.bnames = bl.BaselineNames(self.settings.namespace)
        self.live = live_ids(live)
        self.fleet_small = fleet_small
        self.static = idle_ids(live, fleet_small)  # machines whose heartbeats the bench writes
        self.workdir = Path(tempfile.mkdtemp(prefix="rundispatch-bench-"))
        self.env = settings_env(self.settings)
        self.procs = Procs(self.workdir, self.env)
        self.log = log
        self.redis = aioredis.Redis.from_url(self.settings.redis_url.get_secret_value())
        self.requests_exchange: AbstractExchange | None = None
        self.heartbeats_exchange: AbstractExchange | None = None
        self.machines = RedisMachines(self.redis, self.names)
        self.bl_exchange: AbstractExchange | None = None
        self.bl_connection: aio_pika.abc.AbstractRobustConnection | None = None
        self.rabbit_pid = pid_listening_on(_port(self.settings.amqp_url.get_secret_value(), 5672))
        self.redis_pid = pid_listening_on(_port(self.settings.redis_url.get_secret_value(), 6379))
        self.waiting = 0
        self._keepalive: asyncio.Task[None] | None = None
        self._ours_workers = False
        self._bl_workers = False
        self._counter = 0
        self.tracing = False  # processes started now count their round trips (bench/trace)
        # The live machines' workers replaced by one cheap simulator (bench/simfleet.py).
        self.simulated = False

    # ---- set-up and tear-down -------------------------------------------------------------
    async def setup(self) -> None:
        await self.declare_product_topology()
        await bl.declare_topology(self.settings, self.live)
        self.bl_connection = await aio_pika.connect_robust(
            self.settings.amqp_url.get_secret_value()
        )
        channel = await self.bl_connection.channel(publisher_confirms=True)
        self.bl_exchange = await channel.get_exchange(self.bnames.requests, ensure=False)
        self.requests_exchange = await channel.get_exchange(
            self.names.requests_exchange, ensure=False
        )
        self.heartbeats_exchange = await channel.get_exchange(
            self.names.heartbeats_exchange, ensure=False
        )
        self.apply_fleet(self.fleet_small)
        await record_heartbeats(self.machines, self.static)
        await insert_waiting(self.redis, self.settings, 10)
        self.waiting = 10
        self._keepalive = asyncio.create_task(self.keepalive())

    def env_for(self, name: str) -> dict[str, str] | None:
        if not self.tracing:
            return None
        env = dict(self.env)
        env["PYTHONPATH"] = str(REPO / "bench" / "trace")
        env["RUNDISPATCH_BENCH_TRACE"] = str(self.workdir / f"trace-{name}.json")
        return env

    def trace_counts(self, name: str) -> dict[str, int]:
        path = self.workdir / f"trace-{name}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    async def snapshot(self, names: Sequence[str]) -> dict[str, dict[str, int]]:
        """Ask traced processes to write their counts (SIGUSR1); read them."""
        for name in names:
            proc = self.procs.procs.get(name)
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGUSR1)
        await asyncio.sleep(0.5)
        return {name: self.trace_counts(name) for name in names}

    def stop_workers(self, kind: str) -> None:
        prefix = "worker-" if kind == "ours" else "blworker-"
        for name in [n for n in self.procs.procs if n.startswith(prefix)]:
            self.procs.stop(name)
        if kind == "ours":
            self._ours_workers = False
        else:
            self._bl_workers = False

    @contextlib.asynccontextmanager
    async def active_replicas(self, mode: str) -> AsyncIterator[None]:
        """Dispatchers started in this block run with ``RUNDISPATCH_ACTIVE_REPLICAS=mode``: the
        shared queues the replicas consume (empty between drains) are declared again for it,
        and again with the default after the block."""
        await self._declare_shared_queues(mode)
        try:
            yield
        finally:
            await self._declare_shared_queues("all")

    async def _declare_shared_queues(self, mode: str) -> None:
        self.env["RUNDISPATCH_ACTIVE_REPLICAS"] = mode  # in place: the Procs share this dict
        connection = await aio_pika.connect(self.settings.amqp_url.get_secret_value())
        async with connection:
            holding_runs = run_queue_bindings(self.names)
            for queue in consumed_queues(self.names):
                channel = await connection.channel()
                if queue in holding_runs:  # a run left there would be lost: refused
                    await delete_if_empty(channel, queue)
                else:  # heartbeats and signals are hints
                    await channel.queue_delete(queue)
        await self.declare_product_topology()

    async def declare_product_topology(self, timeout: float = 60.0) -> None:
        """The product declares its own exchanges and queues: start a dispatcher once (the code
        of the tree as it is now), wait for its requests queue, stop it."""
        names = self.start_dispatchers("ours")
        deadline = time.monotonic() + timeout
        connection = await aio_pika.connect(self.settings.amqp_url.get_secret_value())
        try:
            while True:
                self.procs.check_alive(*names)
                channel = await connection.channel()
                try:
                    await channel.declare_queue(self.names.signals_queue, passive=True)
                    await asyncio.sleep(1.0)  # its bindings follow the declaration
                    break
                except aio_pika.exceptions.ChannelClosed:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the dispatcher did not declare its topology") from None
                    await asyncio.sleep(0.3)
                finally:
                    if not channel.is_closed:
                        await channel.close()
        finally:
            await connection.close()
            for name in names:
                self.procs.stop(name)

    def start_ours_workers(self) -> bool:
        """Start a simulated worker per live machine (once); True when started now."""
        if self._ours_workers:
            return False
        if self.simulated:
            argv = ["-m", "bench.simfleet", "--machines", ",".join(self.live)]
            argv += ["--counts", str(self.workdir / "simfleet-counts.json")]
            argv += ["--state-root", str(self.workdir)]
            self.procs.start("worker-simfleet", argv, self.env_for("worker-simfleet"))
            self._ours_workers = True
            return True
        for machine_id in self.live:
            name = f"worker-{machine_id}"
            self.procs.start(
                name,
                [
                    "-m",
                    "workers",
                    "serve",
                    "--machine-id",
                    machine_id,
                    "--executor",
                    "simulate",
                    "--state-dir",
                    str(self.workdir / f"state-{machine_id}"),
                ],
                self.env_for(name),
            )
        self._ours_workers = True
        return True

    def start_baseline_workers(self) -> bool:
        if self._bl_workers:
            return False
        for machine_id in self.live:
            name = f"blworker-{machine_id}"
            self.procs.start(
                name,
                ["-m", "bench.baseline", "worker", "--machine", machine_id],
                self.env_for(name),
            )
        self._bl_workers = True
        return True

    def sim_counts(self) -> dict[str, int]:
        """The simulated fleet's requests so far (start, finish), as it last wrote them."""
        path = self.workdir / "simfleet-counts.json"
        if not path.exists():
            return {"start": 0, "finish": 0}
        counts: dict[str, int] = json.loads(path.read_text())
        return counts

    async def ensure_workers(self, kind: str) -> None:
        started = self.start_ours_workers() if kind == "ours" else self.start_baseline_workers()
        if started:
            await asyncio.sleep(3.0)  # imports, connections, first heartbeat

    async def close(self) -> dict[str, int]:
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
        self.procs.stop_all()
        if self.bl_connection is not None:
            with contextlib.suppress(Exception):
                await self.bl_connection.close()
        await self.redis.aclose()
        queues = [self.names.machine_queue(m) for m in (*self.live, *self.static)]
        queues += [self.names.machine_replies_queue(m) for m in (*self.live, *self.static)]
        queues.append(self.names.reports_queue)
        queues += self.bnames.queues(self.live)
        return await cleanup(self.settings, queues=queues, exchanges=self.bnames.exchanges())

    def apply_fleet(self, total: int, prune: bool = False) -> float:
        path = self.workdir / f"fleet-{total}.json"
        path.write_text(json.dumps(fleet_document(self.live, total)))
        return self.apply_document(path, prune)

    def apply_document(self, path: Path, prune: bool = False) -> float:
        argv = [sys.executable, "-m", "dispatcher", "apply", str(path), "--no-signal"]
        began = time.perf_counter()
        result = subprocess.run(
            argv + (["--prune"] if prune else []),
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"apply failed: {result.stderr or result.stdout}")
        return time.perf_counter() - began

    async def keepalive(self) -> None:
        """Heartbeats of the machines without a worker, over AMQP as a worker sends them: each
        machine every ``heartbeat_interval_s``, spread evenly."""
        interval = self.settings.heartbeat_interval_s
        exchange = self.heartbeats_exchange
        assert exchange is not None
        position = 0.0
        tick = 0.25
        while True:
            machines = self.static
            per_tick = len(machines) * tick / interval
            first = int(position)
            position += per_tick
            due = [machines[i % len(machines)] for i in range(first, int(position))]
            if due:
                await asyncio.gather(
                    *(
                        exchange.publish(
                            aio_pika.Message(
                                static_heartbeat(m).model_dump_json().encode(),
                                content_type="application/json",
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                type="heartbeat",
                                user_id=admin_user_of(self.settings.amqp_url.get_secret_value()),
                            ),
                            "",
                        )
                        for m in due
                    ),
                    return_exceptions=True,
                )
            await asyncio.sleep(tick)

    # ---- processes --------------------------------------------------------------------------
    def start_dispatchers(self, kind: str, count: int = 1) -> list[str]:
        names = []
        for index in range(count):
            self._counter += 1
            name = f"{'dispatcher' if kind == 'ours' else 'bldispatcher'}-{self._counter}-{index}"
            if kind == "ours":
                self.procs.start(name, ["-m", "dispatcher", "serve"], self.env_for(name))
            else:
                argv = ["-m", "bench.baseline", "dispatcher", "--machines", ",".join(self.live)]
                argv += ["--slots", str(LIVE_SLOTS)]
                self.procs.start(name, argv, self.env_for(name))
            names.append(name)
        return names

    def pids_of(self, names: Sequence[str]) -> list[int]:
        return [self.procs.procs[n].pid for n in names if n in self.procs.procs]

    def worker_pids(self, kind: str) -> list[int]:
        return self.procs.pids("worker-" if kind == "ours" else "blworker-")

    async def wait_online(self, since: float, timeout: float = 20.0) -> None:
        """Until the dispatcher has recorded a heartbeat of every live machine after ``since``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pipe = self.redis.pipeline(transaction=False)
            for machine_id in self.live:
                pipe.zscore(self.names.heartbeat_index, machine_id)
            scores = await pipe.execute()
            if all(s is not None and s >= since for s in scores):
                return
            await asyncio.sleep(0.2)
        raise RuntimeError("the live machines did not come online (no heartbeats recorded)")

    def finished_key(self, kind: str) -> str:
        return self.names.finished("succeeded") if kind == "ours" else self.bnames.finished

    async def failures(self) -> dict[str, int]:
        counts = {}
        for status in ("failed", "rejected", "timed_out", "cancelled"):
            n = int(await self.redis.zcard(self.names.finished(status)))
            if n:
                counts[status] = n
        return counts

    async def active_consumers(self) -> int:
        """Consumers RabbitMQ delivers the product's requests to (declare-ok: at once, but a
        standby of a single-active-consumer queue is not counted)."""
        assert self.bl_connection is not None
        channel = await self.bl_connection.channel()
        try:
            queue = await channel.declare_queue(self.names.requests_queue, passive=True)
            return queue.declaration_result.consumer_count or 0
        finally:
            await channel.close()

    async def wait_serving(self, names: list[str], dispatchers: int, timeout: float = 60) -> None:
        """Until the management API lists ``dispatchers`` consumers of the requests queue
        (a standby's included; its figures lag by up to a few seconds) and the processes are
        done starting (below ``SETTLED_CORES`` together)."""
        deadline = time.monotonic() + timeout
        while True:
            consumers = await read_consumers(
                self.settings.broker_admin_url.get_secret_value(),
                vhost_of(self.settings.amqp_url.get_secret_value()),
                [self.names.requests_queue],
            )
            if len(consumers[self.names.requests_queue]) >= dispatchers:
                break
            self.procs.check_alive(*names)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{dispatchers} dispatchers not serving after {timeout:.0f} s")
            await asyncio.sleep(0.3)
        # Then until their start-up work is done: a new replica declares the queues of every
        # machine it hears (1,000 in the fleet), for a few seconds; in the window it would be
        # counted as CPU per run, in some windows and not others.
        pids = self.pids_of(names)
        while time.monotonic() < deadline:
            first = sample(pids)
            await asyncio.sleep(SETTLE_S)
            if cores(first, sample(pids), pids) < SETTLED_CORES:
                return
        raise RuntimeError(f"{dispatchers} dispatchers still busy {timeout:.0f} s after start")

    # ---- throughput: drain a pre-filled requests queue ---------------------------------------
    async def drain(
        self,
        kind: str,
        count: int,
        *,
        dispatchers: int = 1,
        label: str,
        profile: bool = False,
        serve_first: bool = False,
    ) -> dict[str, Any]:
        """Drain ``count`` pre-filled runs. ``serve_first``: the dispatchers are started and
        serving (every one's consumer of the requests queue listed, a standby's included)
        before the runs are published, so that no start-up falls in the window; otherwise
        they start on a full queue and the window opens once each has registered its consumer
        (which a standby of ``active_replicas=one`` does not show: use ``serve_first``)."""
        await self.ensure_workers(kind)
        quiet = await wait_quiet()
        exchange = self.requests_exchange if kind == "ours" else self.bl_exchange
        assert exchange is not None
        self._counter += 1
        prefix = f"{label}-{self._counter}-"
        key = self.finished_key(kind)
        base = int(await self.redis.zcard(key))
        failed_before = await self.failures()
        names = []
        if serve_first:
            names = self.start_dispatchers(kind, dispatchers)
            await self.wait_serving(names, dispatchers)
        fill_began = time.perf_counter()
        user_id = admin_user_of(self.settings.amqp_url.get_secret_value())
        await prefill(exchange, count, LIVE_CONNECTIONS, OWNER, prefix, user_id)
        fill_s = time.perf_counter() - fill_began
        if kind == "ours":
            await record_heartbeats(self.machines, self.static)
        worker_names = [
            n for n in self.procs.procs if n.startswith("worker-" if kind == "ours" else "blw")
        ]
        traced_before = await self.snapshot(worker_names) if self.tracing else {}
        if not serve_first:
            names = self.start_dispatchers(kind, dispatchers)
        dpids = self.pids_of(names)
        wpids = self.worker_pids(kind)
        others = [p for p in (self.rabbit_pid, self.redis_pid) if p]
        pids = [*dpids, *wpids, *others, os.getpid()]
        spies: list[subprocess.Popen[bytes]] = []
        traced_after: dict[str, dict[str, int]] = {}
        points: list[tuple[int, CpuSample]] = []
        rss = (0, 0)
        began = time.monotonic()
        timeout = max(90.0, count / 25)
        # The window opens once every dispatcher serves (its consumer registered): a replica
        # still importing and connecting while another already drains is start-up, not the
        # CPU per run of two replicas (up to ~0.5 CPU s in a ~5 s window).
        serving_at: int | None = None if kind == "ours" and not serve_first else 0
        try:
            while True:
                done = int(await self.redis.zcard(key)) - base
                points.append((done, sample(pids)))
                if serving_at is None and await self.active_consumers() >= dispatchers:
                    serving_at = done
                if profile and not spies and done >= 0.1 * count:
                    spies.append(self.start_profiler(dpids[0], f"dispatcher-{label}"))
                    if wpids:
                        spies.append(self.start_profiler(wpids[0], f"worker-{label}"))
                if done >= count:
                    if self.tracing:
                        traced_after = await self.snapshot([*names, *worker_names])
                    break
                if time.monotonic() - began > timeout:
                    raise RuntimeError(
                        f"{label}: only {done}/{count} runs succeeded in {timeout:.0f} s; "
                        f"failures {await self.failures()}\n{self.procs.log_tail(names[0])}"
                    )
                self.procs.check_alive(*names)
                rss = max(rss, proc_rss(dpids[0]))
                await asyncio.sleep(POLL_S)
        finally:
            for spy in spies:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.wait(timeout=30)
            for name in names:
                self.procs.stop(name)
        if serving_at is None or serving_at >= 0.5 * count:
            raise RuntimeError(f"{label}: the dispatchers served only after {serving_at} runs")
        low, first = at_mark(points, max(0.1 * count, serving_at))
        high, last = at_mark(points, 0.9 * count)
        span = max(1e-9, last.at - first.at)
        runs = max(1, high - low)
        busy, steal = machine_load(first, last)
        failed_after = await self.failures()
        result: dict[str, Any] = {
            "kind": kind,
            "label": label,
            "runs": count,
            "dispatchers": dispatchers,
            "window_from_run": low,
            "rate": round(runs / span, 1),
            "window_s": round(span, 2),
            "prefill_s": round(fill_s, 2),
            "dispatcher_cores": round(cores(first, last, dpids), 3),
            "worker_cores": round(cores(first, last, wpids), 3),
            "rabbit_cores": round(cores(first, last, [self.rabbit_pid or -1]), 3),
            "redis_cores": round(cores(first, last, [self.redis_pid or -1]), 3),
            "machine_busy": round(busy, 2),
            "steal": round(steal, 3),
            "others_cores": round(max(0.0, busy - cores(first, last, pids)), 2),
            "busy_before": round(quiet, 2),
            "dispatcher_rss_mb": round(rss[0] / 2**20, 1),
            "dispatcher_peak_rss_mb": round(rss[1] / 2**20, 1),
        }
        for group, group_pids in (
            ("dispatcher", dpids),
            ("worker", wpids),
            ("rabbit", [self.rabbit_pid or -1]),
        ):
            used = cpu_seconds(first, last, group_pids)
            result[f"{group}_us_per_run"] = round(used / runs * 1e6)
        if self.tracing:
            result["per_run"] = per_run(traced_before, traced_after, names, worker_names, count)
        new_failures = {k: v - failed_before.get(k, 0) for k, v in failed_after.items()}
        new_failures = {k: v for k, v in new_failures.items() if v}
        if new_failures and kind == "ours":
            result["failures"] = new_failures
        self.log(
            f"  {label:<22} {result['rate']:>7.1f} runs/s  dispatcher "
            f"{result['dispatcher_us_per_run']:>5} µs/run ({result['dispatcher_cores']:.2f} "
            f"cores)  workers {result['worker_cores']:.2f}  rabbit {result['rabbit_cores']:.2f}"
            f"  busy {busy:.2f} (others {result['others_cores']:.2f}) steal {steal:.2f}"
        )
        return result

    def start_profiler(self, pid: int, role: str) -> subprocess.Popen[bytes]:
        """py-spy on one process for 8 s at 200 Hz; collapsed stacks in bench/results/."""
        out = REPO / "bench" / "results" / f"profile-{role}.txt"
        spy = Path(sys.executable).parent / "py-spy"
        return subprocess.Popen(
            [
                *(str(spy), "record", "--pid", str(pid), "--duration", "8", "--rate", "200"),
                *("--format", "raw", "--output", str(out), "--nonblocking"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    # ---- latency: a paced producer process, an observer on the events exchange --------------
    async def paced(
        self, kind: str, rate: float, duration: float, warmup: float = 2.0, dispatchers: int = 1
    ) -> dict:
        await self.ensure_workers(kind)
        quiet = await wait_quiet()
        assert self.bl_connection is not None
        started = time.time()
        names = self.start_dispatchers(kind, dispatchers)
        dpids = self.pids_of(names)
        if kind == "ours":
            await record_heartbeats(self.machines, self.static)
            await self.wait_online(started)
        else:
            await asyncio.sleep(3.0)  # the baseline needs no heartbeats: give it its start-up
        seen: dict[str, dict[str, float]] = {}

        def observe(message: AbstractIncomingMessage) -> None:
            now = time.time()
            data = json.loads(message.body)
            entry = seen.setdefault(str(data["run_id"]), {"submitted": data["submitted_at"]})
            entry[event_of(str(message.routing_key))] = now - float(data["submitted_at"])

        channel = await self.bl_connection.channel()
        await channel.set_qos(prefetch_count=5000)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        exchange = self.names.events_exchange if kind == "ours" else self.bnames.events
        for key in ("run.dispatched", "run.started"):
            # ours: run.<status>.<submitter>; the baseline's: run.<status> (# matches none)
            await queue.bind(exchange, event_binding(key))
        await queue.consume(observe, no_ack=True)
        self._counter += 1
        prefix = f"lat-{kind}-{self._counter}-"
        target = self.names.requests_exchange if kind == "ours" else self.bnames.requests
        producer = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.producer",
            "--exchange",
            target,
            "--rate",
            f"{rate:.1f}",
            "--duration",
            f"{duration:.1f}",
            "--connections",
            ",".join(LIVE_CONNECTIONS),
            "--owner",
            OWNER,
            "--prefix",
            prefix,
            cwd=REPO,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
        )
        pids = [*dpids, *self.worker_pids(kind), producer.pid, os.getpid()]
        pids += [p for p in (self.rabbit_pid, self.redis_pid) if p]
        first = sample(pids)
        slots: list[int] = []
        watcher = asyncio.create_task(self.watch_slots(kind, slots))
        try:
            await asyncio.sleep(duration)  # sample while the producer still runs
            last = sample(pids)
            watcher.cancel()
            out, _ = await asyncio.wait_for(producer.communicate(), timeout=60)
            summary = json.loads(out.decode().strip().splitlines()[-1])
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if sum(1 for e in seen.values() if "run.started" in e) >= summary["sent"]:
                    break
                await asyncio.sleep(0.2)
        finally:
            watcher.cancel()
            with contextlib.suppress(ProcessLookupError):
                producer.kill()
            for name in names:
                self.procs.stop(name)
            await channel.close()
        window = [e for e in seen.values() if e["submitted"] >= started + 0 and e]
        cutoff = min((e["submitted"] for e in window), default=0) + warmup
        measured = [e for e in window if e["submitted"] >= cutoff]
        measured.sort(key=lambda e: e["submitted"])
        stages = await self.stages(kind, seen, measured) if kind == "ours" else {}
        fifth = max(1, len(measured) // 5)
        early = [e["run.started"] * 1000 for e in measured[:fifth] if "run.started" in e]
        late = [e["run.started"] * 1000 for e in measured[-fifth:] if "run.started" in e]
        dispatched = [e["run.dispatched"] * 1000 for e in measured if "run.dispatched" in e]
        begun = [e["run.started"] * 1000 for e in measured if "run.started" in e]
        busy, steal = machine_load(first, last)
        result = {
            "kind": kind,
            "offered_rate": round(rate, 1),
            "achieved_rate": round(summary["rate"], 1),
            "sent": summary["sent"],
            "measured_runs": len(measured),
            "missing_started": summary["sent"]
            - sum(1 for e in seen.values() if "run.started" in e),
            "dispatched_p50_ms": round(percentile(dispatched, 50), 1),
            "dispatched_p99_ms": round(percentile(dispatched, 99), 1),
            "started_p50_ms": round(percentile(begun, 50), 1),
            "started_p99_ms": round(percentile(begun, 99), 1),
            "started_max_ms": round(max(begun, default=float("nan")), 1),
            # A backlog that grows (the system did not keep up) shows as late >> early.
            "started_p50_first_fifth_ms": round(percentile(early, 50), 1),
            "started_p50_last_fifth_ms": round(percentile(late, 50), 1),
            "stages": stages,
            # Raw samples for pooling over windows (bench.stats.LatencyPool); the caller
            # takes them out before the result is written.
            "_started_ms": begun,
            "_measured_s": max(0.0, duration - warmup),
            # Runs on the machines (dispatched or running) every 0.25 s, of 10 per machine.
            "slots_used_mean": round(statistics.mean(slots), 1) if slots else None,
            "slots_used_max": max(slots, default=None),
            # Runs still assigned when the window began (left over from earlier windows).
            "slots_used_first": slots[0] if slots else None,
            "slots_total": 10 * len(self.live),
            "dispatcher_cores": round(cores(first, last, dpids), 3),
            # The dispatcher processes' CPU over the window per run the producer sent in it.
            "dispatcher_us_per_run": round(
                1e6 * cpu_seconds(first, last, dpids) / max(1, summary["sent"])
            ),
            "worker_cores": round(cores(first, last, self.worker_pids(kind)), 3),
            "producer_cores": round(cores(first, last, [producer.pid]), 3),
            "rabbit_cores": round(cores(first, last, [self.rabbit_pid or -1]), 3),
            "machine_busy": round(busy, 2),
            "steal": round(steal, 3),
            "others_cores": round(max(0.0, busy - cores(first, last, pids)), 2),
            "busy_before": round(quiet, 2),
        }
        processes = f" ({dispatchers} dispatchers)" if dispatchers > 1 else ""
        self.log(
            f"  latency {kind:<9} at {rate:.0f}/s{processes}: dispatched p50"
            f" {result['dispatched_p50_ms']} / p99 {result['dispatched_p99_ms']} ms,"
            f" started p50 {result['started_p50_ms']}"
            f" / p99 {result['started_p99_ms']} ms (missing {result['missing_started']}),"
            f" dispatcher {result['dispatcher_us_per_run']:,} µs/run"
        )
        return result

    async def watch_slots(self, kind: str, into: list[int]) -> None:
        """Sum of the live machines' assigned runs (the product's slot bookkeeping)."""
        while True:
            pipe = self.redis.pipeline(transaction=False)
            for machine_id in self.live:
                if kind == "ours":
                    pipe.hlen(self.names.machine_assigned(machine_id))
                else:
                    pipe.hlen(self.bnames.key("assigned", machine_id))
            into.append(sum(await pipe.execute()))
            await asyncio.sleep(0.25)

    async def stages(
        self, kind: str, seen: dict[str, dict[str, float]], measured: list[dict[str, float]]
    ) -> dict[str, dict[str, float]]:
        """Where a run's time goes, from the timestamps the product records (ms, p50/p99):
        submit -> queued (request consumed, admitted), queued -> dispatched (the placement
        pass that took it began), pass began -> run.dispatched observed (claim, publish),
        dispatched -> started (assignment delivered, fenced start), started -> finished (the
        zero-length flow and the worker's outcome batch: the slot is busy until then)."""
        by_id = {id(e): run_id for run_id, e in seen.items()}
        run_ids = [by_id[id(e)] for e in measured]
        pipe = self.redis.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hmget(
                self.names.run(run_id), "queued_at", "dispatched_at", "started_at", "finished_at"
            )
        rows = await pipe.execute()
        spans: dict[str, list[float]] = {
            "submit_to_queued": [],
            "queued_to_pass": [],
            "pass_to_dispatched_event": [],
            "dispatched_to_started": [],
            "started_to_finished": [],
        }
        for entry, row in zip(measured, rows, strict=True):
            if None in row or "run.dispatched" not in entry:
                continue
            queued, dispatched, begun, ended = (float(x) for x in row)
            submitted = entry["submitted"]
            spans["submit_to_queued"].append(queued - submitted)
            spans["queued_to_pass"].append(dispatched - queued)
            spans["pass_to_dispatched_event"].append(
                entry["run.dispatched"] - (dispatched - submitted)
            )
            spans["dispatched_to_started"].append(begun - dispatched)
            spans["started_to_finished"].append(ended - begun)
        return {
            name: {
                "p50_ms": round(percentile(values, 50) * 1000, 1),
                "p99_ms": round(percentile(values, 99) * 1000, 1),
            }
            for name, values in spans.items()
        }

    # ---- scale --------------------------------------------------------------------------------
    async def fleet_scale(self, total: int, count: int, profile: bool = False) -> dict[str, Any]:
        """Drain with ``total`` machines registered (the extra ones online, heartbeating)."""
        apply_s = self.apply_fleet(total)
        extra = idle_ids(len(self.live), total)
        began = time.perf_counter()
        await record_heartbeats(self.machines, extra)
        heartbeat_s = time.perf_counter() - began
        small = self.static
        self.static = extra
        try:
            result = await self.drain("ours", count, label=f"fleet-{total}", profile=profile)
        finally:
            self.static = small
            self.apply_fleet(self.fleet_small, prune=True)
            gone = [m for m in extra if m not in small]
            await forget_machines(self.redis, self.names, gone)
            # Their queues too: left behind, ~1,000 idle quorum queues cost RabbitMQ CPU and
            # files in every later section (and in later runs: close() knows only its own).
            self.log(f"  deleting the queues of {len(gone)} machines")
            await delete_queues(
                self.settings,
                [q for m in gone for q in (self.names.machine_queue(m),
                                           self.names.machine_replies_queue(m))],
            )  # fmt: skip
        result["machines"] = total
        result["apply_s"] = round(apply_s, 2)
        result["direct_heartbeats_s"] = round(heartbeat_s, 2)
        return result

    async def fill_queue(self, total: int) -> dict[str, Any]:
        """Bring the waiting runs to ``total``; measure Redis memory per queued run."""
        before = await self.redis.info("memory")
        insert_s = await insert_waiting(
            self.redis, self.settings, total - self.waiting, start=self.waiting
        )
        added = total - self.waiting
        self.waiting = total
        after = await self.redis.info("memory")
        usage = await queued_run_bytes(self.redis, self.settings, total)
        delta = int(after["used_memory"]) - int(before["used_memory"])
        usage["used_memory_delta_per_run"] = round(delta / added)
        usage["queued"] = total
        usage["insert_s"] = round(insert_s, 1)
        usage["insert_rate"] = round(added / insert_s)
        self.log(
            f"  queued {total} waiting runs in {insert_s:.1f} s: {usage['bytes_per_queued_run']} "
            f"B/run by MEMORY USAGE (hash {usage['hash_bytes_mean']:.0f} + indexes "
            f"{usage['index_bytes_per_run']:.0f}); used_memory delta "
            f"{usage['used_memory_delta_per_run']} B/run"
        )
        return usage

    async def idle_rss(self, seconds: float = 8.0) -> dict[str, Any]:
        """A dispatcher with the current backlog, idle: RSS and CPU (sweeps, re-sweeps)."""
        await self.ensure_workers("ours")
        names = self.start_dispatchers("ours")
        pid = self.pids_of(names)[0]
        started = time.time()
        try:
            await self.wait_online(started)
            first = sample([pid])
            await asyncio.sleep(seconds)
            last = sample([pid])
            rss, hwm = proc_rss(pid)
        finally:
            self.procs.stop(names[0])
        return {
            "queued": self.waiting,
            "idle_cores": round(cores(first, last, [pid]), 3),
            "rss_mb": round(rss / 2**20, 1),
            "peak_rss_mb": round(hwm / 2**20, 1),
        }


def per_run(
    before: dict[str, dict[str, int]],
    after: dict[str, dict[str, int]],
    dispatchers: Sequence[str],
    workers: Sequence[str],
    runs: int,
) -> dict[str, dict[str, float]]:
    """Counted round trips and frames per run, for the dispatchers and for the workers."""
    out: dict[str, dict[str, float]] = {}
    for role, group in (("dispatcher", dispatchers), ("worker", workers)):
        total: dict[str, int] = {}
        for name in group:
            for key, value in after.get(name, {}).items():
                total[key] = total.get(key, 0) + value - before.get(name, {}).get(key, 0)
        out[role] = {k: round(v / runs, 3) for k, v in sorted(total.items()) if v}
    return out


def _port(url: str, default: int) -> int:
    from urllib.parse import urlparse

    return urlparse(url).port or default


def median_of(results: Sequence[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in results))
