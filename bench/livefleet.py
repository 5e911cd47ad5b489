"""The ``livefleet`` section: a live fleet of thousands of machines, spoken for by one
simulator process (``bench/simulator.py``), and what it costs the dispatcher.

The fleet (applied with ``dispatcher apply --no-signal`` beside the bench's own) has ``size``
machines in ``groups`` groups: group ``fleet00`` holds the ``serving`` machines (windows_server,
10 unattended slots each) that connections ``c-fleet-0`` .. ``c-fleet-9`` target, the other
groups the rest. One dispatcher serves the whole section. Each *phase* starts the simulator
for the first ``n`` machines of the fleet (the serving ones always among them), waits until
the dispatcher has recorded a heartbeat of each (and, when the fleet shrank, until the silent
machines are marked offline), then measures:

* a **heartbeat window** (no runs): dispatcher CPU ÷ heartbeats the simulator sent meanwhile
  = CPU µs per heartbeat (gross: everything the dispatcher did in the window, its idle chores
  included);
* a **drain** (unless ``drain`` is off): ``runs`` zero-length runs of the ``c-fleet-*``
  connections published at once; dispatcher CPU per run between the 10 % and 90 % marks,
  while the whole live fleet keeps heartbeating.

The phases alternate ``10`` and ``size`` live machines (``pairs`` times), so that both sides of
``ratio_live_fleet_10k`` see about the same machine; a ladder of heartbeat-only phases (1,000
and 5,000) comes first.

The simulator connects as a bench-only broker user ``<ns>.simulator`` with RabbitMQ's
``impersonator`` tag (it may publish with any ``user_id``), write access to the heartbeats and
reports exchanges and read access to the namespace's machine queues. It is not a principal of
the product (``dispatcher.core.principals``) and is deleted at the end with the namespace.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from bench.fleet import OWNER, forget_machines
from bench.livefleet_file import (
    FLEET_CONNECTIONS,
    apply_document,
    live_fleet_document,
    other_ids,
    serving_ids,
)
from bench.procfs import CpuSample, cores, cpu_seconds, machine_load, sample, wait_quiet
from bench.producer import prefill
from bench.queuemem import NodeMemory, delete_many
from bench.stats import paired_ratio, rate_interval
from dispatcher.adapters.amqp.identities import vhost_of
from dispatcher.core.principals import admin_user_of
from dispatcher.crypto import WorkerKeyPair
from dispatcher.names import Names

POLL_S = 0.1


class LiveFleet:
    """The section's fleet, simulator identity, dispatcher and phases."""

    def __init__(
        self,
        bench: Any,  # bench.runner.Bench (not imported: runner.py imports nothing of this)
        log: Callable[[str], None],
        *,
        size: int,
        serving: int = 10,
        groups: int = 20,
        churn: float = 0.02,
        queue_type: str = "classic",
    ) -> None:
        self.bench = bench
        self.log = log
        self.size = size
        self.serving = serving_ids(serving)
        self.groups = groups
        self.churn = churn
        self.queue_type = queue_type
        # One key for the whole fleet and every simulator process (the dispatcher pins a
        # machine's key at its first heartbeat and refuses any other afterwards).
        self.key = WorkerKeyPair.generate().public_key_b64
        self.settings = bench.settings
        self.names: Names = bench.names
        self.machines = [*self.serving, *other_ids(size - serving)]
        self.sim_user = f"{self.names.ns}.simulator"
        self.sim_password = secrets.token_urlsafe(18)
        amqp_url = self.settings.amqp_url.get_secret_value().split(",", maxsplit=1)[0].strip()
        self.admin_url = self.settings.broker_admin_url.get_secret_value()
        self.vhost = vhost_of(amqp_url)
        parts = urlsplit(amqp_url)
        netloc = f"{quote(self.sim_user, safe='')}:{self.sim_password}@{parts.hostname}"
        netloc += f":{parts.port}" if parts.port else ""
        self.sim_url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
        self.dispatcher: str | None = None
        self.simulator: str | None = None
        self._phase = 0

    # ---- set-up and tear-down ---------------------------------------------------------------
    def _admin(self) -> httpx.AsyncClient:
        parts = httpx.URL(self.admin_url)
        return httpx.AsyncClient(
            base_url=f"{parts.scheme}://{parts.host}:{parts.port or 15672}",
            auth=(parts.username or "guest", parts.password or "guest"),
            timeout=30.0,
        )

    async def open(self) -> dict[str, Any]:
        """The simulator's identity, the fleet applied, one dispatcher started; returns what
        the set-up cost (apply seconds, RabbitMQ memory of the machines' queues)."""
        names = self.names
        async with self._admin() as admin:
            user = quote(self.sim_user, safe="")
            vhost = quote(self.vhost, safe="")
            response = await admin.put(
                f"/api/users/{user}", json={"password": self.sim_password, "tags": "impersonator"}
            )
            response.raise_for_status()
            write = f"^({names.heartbeats_exchange}|{names.reports_exchange})$".replace(".", r"\.")
            read = "^" + f"{names.ns}.machine.".replace(".", r"\.") + ".+$"
            response = await admin.put(
                f"/api/permissions/{vhost}/{user}",
                json={"configure": "^$", "write": write, "read": read},
            )
            response.raise_for_status()
        document = live_fleet_document(
            self.bench.live, self.bench.fleet_small, self.size, len(self.serving), self.groups
        )
        path = self.bench.workdir / "livefleet.json"
        path.write_text(json.dumps(document))
        began = time.perf_counter()
        # Groups of ~500 machines: above the default limit of 50, which is a setting (SPEC).
        per_group = -(-(self.size - len(self.serving)) // max(1, self.groups - 1))
        env = dict(self.bench.env, RUNDISPATCH_MAX_GROUP_SIZE=str(max(50, per_group)))
        apply_document(path, env)
        apply_s = time.perf_counter() - began
        self.log(f"  applied {len(self.machines)} machines in {len(self.groups_of())} groups")
        memory = NodeMemory(self.admin_url)
        try:
            before = await memory.breakdown()
            self.dispatcher = self.start_dispatcher()
            await asyncio.sleep(3.0)
            warm = await self.phase(len(self.machines), drain_runs=0, window_s=2.0)
            after = await memory.breakdown()
        finally:
            await memory.aclose()
        queues = 2 * len(self.machines)  # a quorum machine queue and a classic replies queue
        return {
            "apply_s": round(apply_s, 1),
            "first_heartbeats_s": warm["settle_s"],
            "machine_queues": queues,
            "rabbit_erlang_bytes_per_machine": round(
                (after["erlang"] - before["erlang"]) / len(self.machines)
            ),
            "rabbit_memory_before": before,
            "rabbit_memory_after": after,
        }

    def start_dispatcher(self) -> str:
        """The section's one dispatcher, with the machine queue type under test. The bench's
        own workers are stopped first: their queues were declared with the bench's type."""
        self.bench.stop_workers("ours")
        name = f"dispatcher-livefleet-{self.queue_type}"
        env = dict(self.bench.env, RUNDISPATCH_MACHINE_QUEUE_TYPE=self.queue_type)
        self.bench.procs.start(name, ["-m", "dispatcher", "serve"], env)
        return name

    async def fleet_queues(self) -> list[str]:
        """The live fleet's machine and replies queues that exist (listed, not guessed: most
        of them exist only once the machine has sent a heartbeat)."""
        prefix = self.names.machine_queue("")
        mine = set(self.machines)
        async with self._admin() as admin:
            response = await admin.get(
                f"/api/queues/{quote(self.vhost, safe='')}", params={"columns": "name"}
            )
            response.raise_for_status()
        found = []
        for row in response.json():
            name = str(row["name"])
            machine_id = name[len(prefix) :].removesuffix(".replies")
            if name.startswith(prefix) and machine_id in mine:
                found.append(name)
        return found

    def groups_of(self) -> set[str]:
        return {f"fleet{g:02d}" for g in range(self.groups)}

    async def close(self) -> dict[str, int]:
        """Stop the processes; delete the machines' queues, the simulator's identity, the live
        fleet's Redis state; the bench's own fleet applied again (pruned)."""
        if self.simulator is not None:
            self.bench.procs.stop(self.simulator)
        if self.dispatcher is not None:
            self.bench.procs.stop(self.dispatcher)
        deleted = await delete_many(self.admin_url, self.vhost, await self.fleet_queues())
        async with self._admin() as admin:
            await admin.delete(f"/api/users/{quote(self.sim_user, safe='')}")
        self.bench.apply_fleet(self.bench.fleet_small, prune=True)
        await forget_machines(self.bench.redis, self.names, self.machines)
        return {"queues_deleted": deleted}

    # ---- phases ---------------------------------------------------------------------------------
    def start_simulator(self, count: int) -> str:
        if self.simulator is not None:
            self.bench.procs.stop(self.simulator)
        self._phase += 1
        name = f"simulator-{count}-{self._phase}"
        machines = self.bench.workdir / f"{name}.json"
        fleet = {"all": self.machines[:count], "serving": self.serving, "public_key": self.key}
        machines.write_text(json.dumps(fleet))
        self.bench.procs.start(
            name,
            [
                "-m", "bench.simulator", "--url", self.sim_url, "--machines", str(machines),
                "--stats", str(self.stats_path(name)), "--churn", str(self.churn),
            ],
        )  # fmt: skip
        self.simulator = name
        return name

    def stats_path(self, name: str) -> Path:
        return Path(self.bench.workdir) / f"{name}.stats.json"

    def stats(self) -> dict[str, float]:
        """The simulator's counts (written every half second, renamed into place)."""
        assert self.simulator is not None
        for _ in range(20):
            try:
                counts = dict(json.loads(self.stats_path(self.simulator).read_text()))
            except (OSError, ValueError):
                counts = {}
            if "heartbeats" in counts:
                return counts
            time.sleep(0.1)  # the simulator has not written its first counts yet
        raise RuntimeError(f"no counts from {self.simulator}")

    async def settle(self, count: int, since: float, timeout_s: float = 600.0) -> float:
        """Until every simulated machine has a heartbeat recorded after ``since``, the
        heartbeats' queue is short, and the machines no longer simulated are marked offline."""
        redis, names = self.bench.redis, self.names
        began = time.monotonic()
        silent = len(self.machines) - count
        while True:
            assert self.simulator is not None and self.dispatcher is not None
            self.bench.procs.check_alive(self.simulator, self.dispatcher)
            fresh = await redis.zcount(names.heartbeat_index, since, "+inf")
            offline = 0
            if silent:
                marks = await redis.hmget(names.offline_machines, self.machines[count:])
                offline = sum(1 for mark in marks if mark is not None)
            backlog = await self.queue_depth(names.heartbeats_queue)
            declared = await self.declared_queues() if fresh >= count else 0
            if fresh >= count and offline >= silent and backlog < 200 and declared >= 2 * count:
                return time.monotonic() - began
            if time.monotonic() - began > timeout_s:
                raise RuntimeError(
                    f"the live fleet did not settle: {fresh}/{count} machines heard, "
                    f"{offline}/{silent} offline, {backlog} heartbeats queued, "
                    f"{declared}/{2 * count} machine queues declared"
                )
            await asyncio.sleep(0.5)

    async def declared_queues(self) -> int:
        """How many machine and replies queues of the live fleet exist (the dispatcher
        declares them in the background after each machine's first heartbeat)."""
        pattern = "^" + re.escape(self.names.machine_queue("")) + "f[sm]-"
        async with self._admin() as admin:
            response = await admin.get(
                f"/api/queues/{quote(self.vhost, safe='')}",
                params={"page": 1, "page_size": 1, "name": pattern, "use_regex": "true"},
            )
            response.raise_for_status()
            return int(response.json()["filtered_count"])

    async def queue_depth(self, queue: str) -> int:
        async with self._admin() as admin:
            path = f"/api/queues/{quote(self.vhost, safe='')}/{quote(queue, safe='')}"
            response = await admin.get(path, params={"columns": "messages"})
            return int(response.json().get("messages") or 0) if response.is_success else 0

    async def heartbeat_window(
        self, pids: list[int], window_s: float
    ) -> tuple[float, CpuSample, CpuSample]:
        """Heartbeats a second the simulator sent during ``window_s``, and the CPU samples of
        ``pids`` at its start and end."""
        first, stats0 = sample(pids), self.stats()
        await asyncio.sleep(window_s)
        last, stats1 = sample(pids), self.stats()
        span = max(1e-9, stats1["at"] - stats0["at"])
        return (stats1["heartbeats"] - stats0["heartbeats"]) / span, first, last

    async def phase(self, count: int, *, drain_runs: int, window_s: float) -> dict[str, Any]:
        """Simulate ``count`` live machines; measure heartbeats (and a drain)."""
        assert self.dispatcher is not None
        dpid = self.bench.pids_of([self.dispatcher])[0]
        since = time.time()
        name = self.start_simulator(count)
        settle_s = await self.settle(count, since)
        quiet = await wait_quiet()
        spid = self.bench.procs.procs[name].pid
        pids = [dpid, spid, *(p for p in (self.bench.rabbit_pid, self.bench.redis_pid) if p)]
        beats, first, last = await self.heartbeat_window(pids, window_s)
        span = last.at - first.at
        dispatcher_cores = cores(first, last, [dpid])
        busy, steal = machine_load(first, last)
        result: dict[str, Any] = {
            "live_machines": count,
            "settle_s": round(settle_s, 1),
            "heartbeats_per_s": round(beats, 1),
            "dispatcher_cores": round(dispatcher_cores, 4),
            "heartbeat_cpu_us": round(dispatcher_cores * 1e6 / beats, 1) if beats else None,
            "simulator_cores": round(cores(first, last, [spid]), 3),
            "rabbit_cores": round(cores(first, last, [self.bench.rabbit_pid or -1]), 3),
            "redis_cores": round(cores(first, last, [self.bench.redis_pid or -1]), 3),
            "window_s": round(span, 1),
            "machine_busy": round(busy, 2),
            "steal": round(steal, 3),
            "others_cores": round(max(0.0, busy - cores(first, last, pids)), 2),
            "busy_before": round(quiet, 2),
        }
        self.log(
            f"  {count:>6} live machines: {beats:7.1f} heartbeats/s, dispatcher "
            f"{dispatcher_cores:.3f} cores = {result['heartbeat_cpu_us']} µs/heartbeat "
            f"(simulator {result['simulator_cores']:.2f}, others {result['others_cores']:.2f})"
        )
        if drain_runs:
            result["drain"] = await self.drain(drain_runs, pids, dpid)
        return result

    async def stalled(self, prefix: str, count: int) -> str:
        """What a drain that did not finish left behind: its runs by status, the queues' depths
        and the end of the dispatcher's and the simulator's logs (for the JSON's ``error``)."""
        pipe = self.bench.redis.pipeline(transaction=False)
        for i in range(count):
            pipe.hget(self.names.run(f"{prefix}{i}"), "status")
        statuses = Counter(
            (status.decode() if isinstance(status, bytes) else str(status))
            for status in await pipe.execute()
        )
        depths = {
            queue: await self.queue_depth(queue)
            for queue in (self.names.requests_queue, self.names.heartbeats_queue,
                          self.names.reports_queue, self.names.signals_queue)
        }  # fmt: skip
        tails = {
            name: self.bench.procs.log_tail(name, 1500)
            for name in (self.dispatcher, self.simulator)
            if name is not None
        }
        self.log(f"  stalled drain: runs {dict(statuses)}, queues {depths}")
        for name, tail in tails.items():
            self.log(f"  ---- {name}\n{tail}")
        return f"runs {dict(statuses)}, queues {depths}"

    async def drain(self, count: int, pids: list[int], dpid: int) -> dict[str, Any]:
        """``count`` runs published at once; dispatcher CPU per run between 10 % and 90 %."""
        bench, redis = self.bench, self.bench.redis
        key = self.names.finished("succeeded")
        base = int(await redis.zcard(key))
        self._phase += 1
        prefix = f"lf-{self._phase}-"
        user_id = admin_user_of(self.settings.amqp_url.get_secret_value())
        exchange = bench.requests_exchange
        assert exchange is not None
        filling = asyncio.create_task(
            prefill(exchange, count, FLEET_CONNECTIONS, OWNER, prefix, user_id)
        )
        points: list[tuple[int, Any]] = []
        began = time.monotonic()
        timeout = max(90.0, count / 20)
        try:
            while True:
                done = int(await redis.zcard(key)) - base
                points.append((done, sample(pids)))
                if done >= count:
                    break
                if time.monotonic() - began > timeout:
                    raise RuntimeError(
                        f"live fleet drain: only {done}/{count} runs succeeded in {timeout:.0f} s"
                        f"; failures {await bench.failures()}; {await self.stalled(prefix, count)}"
                    )
                assert self.dispatcher is not None and self.simulator is not None
                bench.procs.check_alive(self.dispatcher, self.simulator)
                await asyncio.sleep(POLL_S)
        finally:
            await filling
        low, first = _at_mark(points, 0.1 * count)
        high, last = _at_mark(points, 0.9 * count)
        runs = max(1, high - low)
        span = max(1e-9, last.at - first.at)
        used = cpu_seconds(first, last, [dpid])
        busy, _ = machine_load(first, last)
        result = {
            "runs": count,
            "rate": round(runs / span, 1),
            "dispatcher_us_per_run": round(used / runs * 1e6),
            "dispatcher_cores": round(cores(first, last, [dpid]), 3),
            "window_s": round(span, 2),
            "machine_busy": round(busy, 2),
            "others_cores": round(max(0.0, busy - cores(first, last, pids)), 2),
        }
        self.log(
            f"         drain: {result['rate']:7.1f} runs/s, dispatcher "
            f"{result['dispatcher_us_per_run']} µs/run ({result['dispatcher_cores']:.2f} cores)"
        )
        return result


def _at_mark(points: list[tuple[int, Any]], mark: float) -> tuple[int, Any]:
    for count, snap in points:
        if count >= mark:
            return count, snap
    return points[-1]


async def live_fleet_section(
    bench: Any,
    log: Callable[[str], None],
    *,
    size: int,
    runs: int,
    pairs: int,
    ladder: Sequence[int] = (1000, 5000),
    window_s: float = 10.0,
    queue_type: str = "classic",
) -> dict[str, Any]:
    """Heartbeat cost at each fleet size, then ``pairs`` interleaved drains with 10 and
    ``size`` live machines; their ratio with its 95 % interval."""
    fleet = LiveFleet(bench, log, size=size, queue_type=queue_type)
    out: dict[str, Any] = {
        "size": size,
        "serving": len(fleet.serving),
        "groups": fleet.groups,
        "machine_queue_type": queue_type,
    }
    try:
        out["setup"] = await fleet.open()
        small = len(fleet.serving)
        out["ladder"] = [
            await fleet.phase(n, drain_runs=0, window_s=window_s)
            for n in sorted({small, *ladder, size})
            if n <= size
        ]
        pairs_out: list[dict[str, Any]] = []
        out["pairs"] = pairs_out
        try:
            for _ in range(pairs):
                pairs_out.append(
                    {
                        "small": await fleet.phase(small, drain_runs=runs, window_s=window_s),
                        "large": await fleet.phase(size, drain_runs=runs, window_s=window_s),
                    }
                )
        except RuntimeError as exc:  # a drain that did not finish: keep what was measured
            log(f"  live fleet stopped early: {exc}")
            out["error"] = str(exc)[:500]
        if pairs_out:
            large_cost = [p["large"]["drain"]["dispatcher_us_per_run"] for p in pairs_out]
            small_cost = [p["small"]["drain"]["dispatcher_us_per_run"] for p in pairs_out]
            out["ratio"] = paired_ratio(large_cost, small_cost).as_dict()
        beat_costs = [p["large"]["heartbeat_cpu_us"] for p in pairs_out]
        beat_costs += [s["heartbeat_cpu_us"] for s in out["ladder"] if s["live_machines"] == size]
        out["heartbeat_cpu_us"] = rate_interval(beat_costs).as_dict()
        out["heartbeat_cpu_us_median"] = statistics.median(beat_costs)
    finally:
        out["cleanup"] = await fleet.close()
    return out
