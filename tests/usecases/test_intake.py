"""Intake, in process: requests queue ─▶ decode ─▶ admit ─▶ record ─▶ publish ─▶ verdicts."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dispatcher.codes import ErrorCode
from dispatcher.core.principals import HELD_FOR_HEADER
from dispatcher.errors import StoreUnavailable
from dispatcher.models import Run, RunStatus
from dispatcher.usecases.ports import Ack, DeadLetter, Retry, Verdict
from tests.support.builders import credentials, fleet, machine, request_payload, sign_in
from tests.support.constants import OWNER
from tests.support.fakes import FakeDelivery
from tests.support.world import World

pytestmark = pytest.mark.unit

GROUP = "g:bots"


def bots(**settings: object) -> World:
    machines = (machine("m1", group_id="bots"), machine("m2", group_id="bots"))
    connections = (
        credentials("c1", group_id="bots"),
        credentials("c2", group_id="bots", username="CONTOSO\\other"),
        sign_in("s1", machine_id="m1", owner=OWNER, account=OWNER),
    )
    return World(fleet(machines=machines, groups=("bots",), connections=connections), **settings)


def unattended(run_id: str, connection: str = "c1", **fields: object) -> dict[str, object]:
    return request_payload(run_id=run_id, connection_id=connection, mode="unattended", **fields)


async def test_a_request_is_queued_its_event_published_and_a_pass_asked_for() -> None:
    world = bots()
    verdicts = await world.submit(unattended("r1", queue_timeout_s=600))
    assert verdicts == [Ack()]
    run = await world.run("r1")
    assert run.status is RunStatus.queued and run.target == GROUP
    assert run.queued_at == world.clock.now
    assert run.queue_deadline == world.clock.now + 600
    assert [e["run_id"] for e in world.publisher.events("run.queued")] == ["r1"]
    assert world.passes.requested == [GROUP]
    assert world.metrics.named("run_submitted") == [(GROUP, "credentials", "unattended")]


async def test_a_batch_keeps_arrival_order_and_is_published_as_one_window() -> None:
    world = bots()
    assert await world.submit(*(unattended(f"r{i}") for i in range(3))) == [Ack()] * 3
    assert [run_id for run_id, _ in await world.store.queue_page(GROUP, 0, -1)] == [
        "r0",
        "r1",
        "r2",
    ]
    assert len(world.publisher.windows) == 1
    assert len(world.publisher.windows[0]) == 3


async def test_a_message_that_is_not_a_request_is_dead_lettered_with_its_reason() -> None:
    world = bots(max_request_bytes=2048)
    verdicts = await world.submit(b"{not json", b"x" * 4096, unattended("r1"))
    assert isinstance(verdicts[0], DeadLetter) and verdicts[0].reason_class == "invalid_json"
    assert isinstance(verdicts[1], DeadLetter) and verdicts[1].reason_class == "oversize"
    assert verdicts[2] == Ack()
    assert world.metrics.named("dead_letter") == [("invalid_json",), ("oversize",)]
    assert (await world.run("r1")).status is RunStatus.queued


@pytest.mark.parametrize(
    ("payload", "code", "labels"),
    [
        (
            unattended("r1", connection="nope"),
            ErrorCode.ConnectionNotFound,
            (None, None, "unattended", "ConnectionNotFound"),
        ),
        (
            unattended("r1", requested_by="mallory@contoso.com"),
            ErrorCode.ConnectionAccessDenied,
            (GROUP, "credentials", "unattended", "ConnectionAccessDenied"),
        ),
        (
            unattended("r1", connection="s1"),
            ErrorCode.UnattendedUnsupportedForConnectWithSignIn,
            ("m:m1", "sign_in", "unattended", "UnattendedUnsupportedForConnectWithSignIn"),
        ),
    ],
)
async def test_a_rejection_is_recorded_with_its_code_and_published(
    payload: dict[str, object], code: ErrorCode, labels: tuple[object, ...]
) -> None:
    world = bots()
    assert await world.submit(payload) == [Ack()]
    run = await world.run("r1")
    assert run.status is RunStatus.rejected
    assert run.error is not None and run.error.code is code
    assert [e.event for e in run.timeline] == ["rejected"]
    assert [e["status"] for e in world.publisher.events("run.rejected")] == ["rejected"]
    assert world.metrics.named("run_rejected") == [labels]
    assert world.passes.requested == []


async def test_throttling_and_a_full_queue_reject_with_the_code_the_store_names() -> None:
    world = bots(throttle_per_minute=2, queue_cap=3)
    await world.submit(unattended("r1"), unattended("r2"), unattended("r3"))
    await world.submit(unattended("r4", connection="c2"), unattended("r5", connection="c2"))
    outcomes = {}
    for run_id in ("r1", "r2", "r3", "r4", "r5"):
        run = await world.run(run_id)
        outcomes[run_id] = (run.status, run.error.code if run.error else None)
    assert outcomes == {
        "r1": (RunStatus.queued, None),
        "r2": (RunStatus.queued, None),
        "r3": (RunStatus.rejected, ErrorCode.DesktopFlowsActionThrottled),
        "r4": (RunStatus.queued, None),
        "r5": (RunStatus.rejected, ErrorCode.QueueFull),
    }
    rejected = [labels[3] for labels in world.metrics.named("run_rejected")]
    assert rejected == ["DesktopFlowsActionThrottled", "QueueFull"]


async def test_a_duplicate_run_id_is_not_a_new_run() -> None:
    world = bots()
    await world.submit(unattended("r1", inputs={"v": 1}))
    await world.submit(unattended("r1", inputs={"v": 2}))
    assert (await world.run("r1")).inputs == {"v": 1}
    assert len(world.publisher.events("run.queued")) == 1
    assert len(world.metrics.named("run_submitted")) == 1


async def test_a_sign_in_run_never_waits_past_its_refresh_token() -> None:
    world = bots()
    world.tokens.refresh_expiry = world.clock.now + 120
    await world.submit(request_payload(run_id="r1", connection_id="s1", mode="attended"))
    assert (await world.run("r1")).queue_deadline == world.clock.now + 120


async def test_a_store_outage_holds_the_batch_and_dead_letters_still_go() -> None:
    world = bots()
    world.fleet.unavailable = True
    verdicts = await world.submit(unattended("r1"), b"[1]")
    assert verdicts[0] == Retry(repr(StoreUnavailable("the fake store is down")), outage=True)
    assert isinstance(verdicts[1], DeadLetter)
    world.fleet.unavailable = False
    world.store.unavailable = True
    retried = await world.submit(unattended("r1"))
    assert isinstance(retried[0], Retry) and retried[0].outage


async def test_cancels_arrive_with_the_requests() -> None:
    world = bots()
    await world.submit(unattended("r1"))
    cancel = json.dumps({"run_id": "r1", "reason": "not needed"}).encode()
    unknown = json.dumps({"run_id": "nope"}).encode()
    verdicts = await world.submit(cancel, unknown, routing_key="cancel")
    assert verdicts[0] == Ack()
    assert isinstance(verdicts[1], DeadLetter) and verdicts[1].reason_class == "unknown_run"
    run = await world.run("r1")
    assert run.status is RunStatus.cancelled
    assert run.error is not None and run.error.message == "not needed"


async def test_a_submitter_may_submit_and_cancel_only_for_the_owners_it_acts_for() -> None:
    world = bots()
    names = world.names
    world.fleet.snapshot = dataclasses.replace(
        world.fleet.snapshot,
        submitters={"env1": frozenset({OWNER.casefold()}), "env2": frozenset({"bob@x.com"})},
    )

    async def send(body: dict[str, object], user_id: str | None, key: str = "submit") -> Verdict:
        delivery = FakeDelivery(json.dumps(body).encode(), key, user_id=user_id)
        [verdict] = await world.intake.handle([delivery])
        return verdict

    assert await send(unattended("r1"), names.submitter_user("env1")) == Ack()
    assert (await world.run("r1")).status is RunStatus.queued
    for run_id, user_id in (
        ("r2", names.submitter_user("env2")),  # acts for bob only
        ("r3", names.submitter_user("nobody")),  # not registered
        ("r4", names.machine_user("m1")),
        ("r5", None),
    ):
        assert await send(unattended(run_id), user_id) == Ack()
        run = await world.run(run_id)
        assert run.status is RunStatus.rejected, run_id
        assert run.error is not None and run.error.code is ErrorCode.ConnectionAccessDenied
        assert "may not submit runs for" in run.error.message
    assert world.metrics.named("message_refused") == [("sender",)] * 4

    cancel = {"run_id": "r1", "reason": "stop"}
    verdict = await send(cancel, names.submitter_user("env2"), "cancel")
    assert isinstance(verdict, DeadLetter) and verdict.reason_class == "sender"
    assert (await world.run("r1")).status is RunStatus.queued
    assert await send(cancel, names.submitter_user("env1"), "cancel") == Ack()
    assert (await world.run("r1")).status is RunStatus.cancelled


async def test_a_request_held_through_an_outage_is_still_its_submitter_s() -> None:
    """A dispatcher publishes a request again when an outage outlasts its hold: the copy
    carries the dispatcher's user id and names the first publisher in a header."""
    world = bots()
    names = world.names
    world.fleet.snapshot = dataclasses.replace(
        world.fleet.snapshot, submitters={"env1": frozenset({OWNER.casefold()})}
    )

    async def held(run_id: str, first: str, by: str | None = "guest") -> Run:
        body = json.dumps(unattended(run_id)).encode()
        headers = {"x-rundispatch-held": 1, HELD_FOR_HEADER: first}
        delivery = FakeDelivery(body, "submit", user_id=by, headers=headers)
        assert await world.intake.handle([delivery]) == [Ack()]
        return await world.run(run_id)

    assert (await held("r1", names.submitter_user("env1"))).status is RunStatus.queued
    assert (await held("r2", "guest")).status is RunStatus.queued  # the admin's own, held
    for run_id, first, by in (
        ("r3", "", "guest"),  # first published with no user id
        ("r4", names.submitter_user("nobody"), "guest"),
        ("r5", "guest", names.submitter_user("env2")),  # not a dispatcher's copy: env2's
    ):
        run = await held(run_id, first, by)
        assert run.status is RunStatus.rejected, run_id
        assert run.error is not None and run.error.code is ErrorCode.ConnectionAccessDenied
