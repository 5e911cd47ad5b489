"""Placement's hand-off, in process, when some runs of a pass cannot be handed off: each
failure is dealt with on its own (failed, retried later, logged) and the other runs of the
pass still go to their machines; a claim the store could not run leaves its run queued."""

from __future__ import annotations

import asyncio

import pytest

from dispatcher.codes import ErrorCode
from dispatcher.errors import RetryableRunError, RunFailure
from dispatcher.models import Connection, RunStatus
from dispatcher.usecases.placement import RETRY_AFTER_S
from dispatcher.usecases.results import Failed
from tests.support.builders import credentials, fleet, machine, request_payload
from tests.support.world import World

pytestmark = pytest.mark.unit

GROUP = "g:bots"


class PasswordsOf:
    """A password per connection; ``failures`` say which connections fail, and how."""

    def __init__(self, failures: dict[str, Exception]) -> None:
        self.failures = failures

    async def password(self, connection: Connection) -> str:
        if connection.connection_id in self.failures:
            raise self.failures[connection.connection_id]
        return f"password-of-{connection.connection_id}"


async def two_runs(failures: dict[str, Exception]) -> World:
    machines = (machine("m1", group_id="bots"), machine("m2", group_id="bots"))
    connections = tuple(
        credentials(c, group_id="bots", username=f"CONTOSO\\{c}") for c in ("c1", "c2", "c3")
    )
    world = World(fleet(machines=machines, groups=("bots",), connections=connections))
    world.passwords.password = PasswordsOf(failures).password  # type: ignore[method-assign]
    for run_id, connection in (("r1", "c1"), ("r2", "c2")):
        await world.submit(
            request_payload(run_id=run_id, connection_id=connection, mode="unattended")
        )
    await world.heartbeat("m1")
    await world.heartbeat("m2")
    return world


def retry_in(world: World) -> float:
    handle = world.placer._retry_handles[GROUP]
    delay = handle.when() - asyncio.get_running_loop().time()
    handle.cancel()
    return delay


async def test_a_permanent_failure_fails_its_run_and_the_others_are_handed_off() -> None:
    world = await two_runs({"c1": RunFailure(ErrorCode.SecretAccessDenied, "denied")})
    asked: list[str] = []
    world.placer.request = lambda *targets: asked.extend(targets)  # type: ignore[method-assign]
    assert await world.place(GROUP) == 1
    assert (await world.run("r1")).status is RunStatus.failed
    assert (await world.run("r2")).status is RunStatus.dispatched
    assert asked == [GROUP]  # r1 left its lane: the run behind it is the new head


async def test_a_transient_failure_retries_after_what_the_vault_asked() -> None:
    busy = RetryableRunError(ErrorCode.VaultUnavailable, "busy", retry_after_s=7.0)
    world = await two_runs({"c1": busy})
    assert await world.place(GROUP) == 1
    assert (await world.run("r1")).status is RunStatus.queued
    assert (await world.run("r2")).status is RunStatus.dispatched
    assert 6.0 < retry_in(world) <= 7.0
    reasons = await world.store.lane_reasons(GROUP, "c1|unattended|normal")
    assert reasons is not None and set(reasons["machines"].values()) == {
        "VaultUnavailable (retrying)"
    }


async def test_a_transient_failure_without_a_hint_retries_after_the_default() -> None:
    world = await two_runs({"c1": RetryableRunError(ErrorCode.VaultUnavailable, "busy")})
    await world.place(GROUP)
    assert RETRY_AFTER_S - 0.5 < retry_in(world) <= RETRY_AFTER_S


async def test_an_unexpected_failure_is_logged_and_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = await two_runs({"c1": RuntimeError("vault client bug")})
    assert await world.place(GROUP) == 1
    assert (await world.run("r1")).status is RunStatus.queued
    assert (await world.run("r2")).status is RunStatus.dispatched
    assert RETRY_AFTER_S - 0.5 < retry_in(world) <= RETRY_AFTER_S
    assert (
        "preparing the hand-off of run r1 failed: RuntimeError('vault client bug')" in caplog.text
    )


async def test_a_claim_the_store_could_not_run_is_logged_and_its_run_stays_queued(
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = await two_runs({})
    real_claim_many = world.store.claim_many

    async def one_fails(claims, now):  # type: ignore[no-untyped-def]
        results = await real_claim_many(claims[1:], now)
        return [Failed(error="script error"), *results]

    world.store.claim_many = one_fails  # type: ignore[method-assign]
    asked: list[str] = []
    world.placer.request = lambda *targets: asked.extend(targets)  # type: ignore[method-assign]
    assert await world.place(GROUP) == 1
    assert "claim of run r1 failed: script error" in caplog.text
    assert (await world.run("r1")).status is RunStatus.queued
    assert (await world.run("r2")).status is RunStatus.dispatched
    assert asked == []  # the lanes were read to their ends; the next pass finds r1
