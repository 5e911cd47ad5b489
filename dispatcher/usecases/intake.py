"""Intake: the data path from the requests queue to a queued (or rejected) run.

    deliveries ─▶ decode ─▶ admit (pure) ─▶ deadline ─▶ record (lifecycle window: Lua with
    outbox) ─▶ publish the window ─▶ verdicts (the consumer acks) ─▶ placement passes

A message that is not a request is dead-lettered with its reason; a cancel is handed to the
canceller; who sent it (the broker-validated ``user_id``, ``core/principals.sender_of``) must be
the dispatcher's own identity or a registered submitter acting for the run's ``requested_by``:
a run request from anyone else ends ``rejected`` with ``ConnectionAccessDenied``, a cancel is
dead-lettered (``sender``), both counted in ``rundispatch_refused_messages_total``. If the store
cannot be reached the messages are held and retried (``Retry`` with ``outage``), nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from dispatcher.codes import ErrorCode
from dispatcher.core.admission import Acceptance, Rejection, admit
from dispatcher.core.deadlines import queue_deadline
from dispatcher.core.decode import decode
from dispatcher.core.fleet import FleetSnapshot
from dispatcher.core.ordering import order_score
from dispatcher.core.principals import Sender, admin_user_of, publisher_of, sender_of
from dispatcher.errors import InvalidMessage, NotFound
from dispatcher.metrics.hooks import MetricsHooks
from dispatcher.models import CancelRequest, ConnectionKind, RunRequest
from dispatcher.names import Names
from dispatcher.settings import Settings
from dispatcher.usecases.cancel import Canceller
from dispatcher.usecases.lifecycle import Lifecycle, Window
from dispatcher.usecases.ports import (
    Ack,
    Admission,
    DeadLetter,
    Delivery,
    FleetSource,
    PassRequests,
    Refusal,
    TokenSource,
    Verdict,
    retry_for,
)
from dispatcher.usecases.results import Queued, Rejected

log = logging.getLogger(__name__)


class Intake:
    """Handles batches of the requests queue (run requests and cancels)."""

    def __init__(
        self,
        *,
        settings: Settings,
        fleet: FleetSource,
        lifecycle: Lifecycle,
        canceller: Canceller,
        placer: PassRequests,
        metrics: MetricsHooks,
        tokens: TokenSource | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.fleet = fleet
        self.lifecycle = lifecycle
        self.canceller = canceller
        self.placer = placer
        self.metrics = metrics
        self.tokens = tokens
        self.clock = clock
        self.names = Names(settings.namespace)
        self.admin_user = admin_user_of(settings.amqp_url.get_secret_value())

    async def handle(self, batch: Sequence[Delivery]) -> list[Verdict]:
        """Decode, admit and record a batch of requests; the verdicts say ack or dead-letter."""
        verdicts: list[Verdict] = []
        work: list[tuple[int, RunRequest | CancelRequest, Sender]] = []
        for index, message in enumerate(batch):
            try:
                decoded = decode(
                    message.body,
                    content_type=message.content_type,
                    content_encoding=message.content_encoding,
                    kind="cancel" if message.routing_key == "cancel" else "submit",
                    max_bytes=self.settings.max_request_bytes,
                )
            except InvalidMessage as invalid:
                self.metrics.dead_letter(invalid.reason_class)
                log.warning("dead-lettering an invalid request: %s", invalid.reason)
                verdicts.append(DeadLetter(invalid.reason, invalid.reason_class))
                continue
            verdicts.append(Ack())
            work.append((index, decoded, self._sender(message)))
        if not work:
            return verdicts
        try:
            fleet = await self.fleet.load()
        except Exception as exc:  # the store is unavailable: every message goes back
            log.warning("store unavailable, %d requests go back to the queue: %s", len(work), exc)
            for index, _, _ in work:
                verdicts[index] = retry_for(exc)
            return verdicts
        now = self.clock()
        async with self.lifecycle.window() as window:
            # A microsecond apart, so runs of one batch keep their arrival order.
            results = await asyncio.gather(
                *(
                    self._record(window, item, sender, fleet, now + position * 1e-6)
                    for position, (_, item, sender) in enumerate(work)
                ),
                return_exceptions=True,
            )
            # The runs are queued in the store: placement may take them while the window's
            # events are being confirmed (waiting for the confirms first added their latency
            # to every run's time in the queue).
            self.placer.request(*(r for r in results if isinstance(r, str)))
        for (index, _, _), result in zip(work, results, strict=True):
            if isinstance(result, NotFound):  # a cancel naming no run: bad input, not an outage
                self.metrics.dead_letter("unknown_run")
                verdicts[index] = DeadLetter(str(result), "unknown_run")
            elif isinstance(result, InvalidMessage):  # a cancel from who may not send it
                self.metrics.dead_letter(result.reason_class)
                verdicts[index] = DeadLetter(result.reason, result.reason_class)
            elif isinstance(result, BaseException):
                log.warning("request could not be recorded, retrying: %r", result)
                verdicts[index] = retry_for(result)
        return verdicts

    def _sender(self, message: Delivery) -> Sender:
        user = publisher_of(self.admin_user, message.user_id, message.headers)
        return sender_of(self.names, self.admin_user, user)

    async def _record(
        self,
        window: Window,
        item: RunRequest | CancelRequest,
        sender: Sender,
        fleet: FleetSnapshot,
        now: float,
    ) -> str | None:
        """Record one decoded request; returns the target to place, if the run queued."""
        if isinstance(item, CancelRequest):
            if sender.kind != "admin":
                run = await self.canceller.runs.get(item.run_id)
                if run is None:
                    raise NotFound(f"no run {item.run_id}")
                if not sender.may_cancel(run.requested_by, fleet.submitters):
                    self.metrics.message_refused("sender")
                    log.warning("refused a cancel of run %s from %s", item.run_id, sender.kind)
                    raise InvalidMessage(
                        f"{sender.describe(None)} may not cancel runs of {run.requested_by}",
                        "sender",
                    )
            await self.canceller.cancel(item.run_id, item.reason or "cancelled over AMQP")
            return None
        request = item
        decision: Rejection | Acceptance = admit(request, fleet, self.settings.max_run_cap_s)
        if not sender.acts_for(request.requested_by, fleet.submitters):
            self.metrics.message_refused("sender")
            log.warning("refused run %s from %s", request.run_id, sender.describe(None))
            decision = Rejection(
                ErrorCode.ConnectionAccessDenied,
                f"{sender.describe(None)} may not submit runs for {request.requested_by}",
            )
        if isinstance(decision, Rejection):
            connection = fleet.connections.get(request.connection_id)
            refusal = Refusal(
                request=request,
                code=decision.code,
                message=decision.message,
                now=now,
                target=connection.target.key if connection else None,
                connection_kind=connection.kind if connection else None,
                submitter=sender.routing_word,
            )
            if isinstance(await window.reject(refusal), Rejected):
                self.metrics.run_rejected(
                    refusal.target,  # unknown connection: label "none"
                    connection.kind.value if connection else None,
                    request.mode.value,
                    decision.code.value,
                )
            return None
        connection, kind = decision.connection, decision.connection.kind
        refresh_expiry = None
        if kind is ConnectionKind.sign_in and self.tokens is not None:
            refresh_expiry = await self.tokens.refresh_token_expiry(connection)
        admission = Admission(
            request=request,
            target=decision.target,
            connection_kind=kind,
            score=order_score(request.priority, now, self.settings.priority_boost_s),
            deadline=queue_deadline(
                enqueued_at=now,
                kind=kind,
                requested_timeout_s=request.queue_timeout_s,
                default_timeout_s=self.settings.queue_timeout_s,
                sign_in_timeout_s=self.settings.sign_in_queue_timeout_s,
                refresh_token_expires_at=refresh_expiry,
            ),
            throttle_limit=self.settings.throttle_per_minute,
            queue_cap=self.settings.queue_cap,
            now=now,
            submitter=sender.routing_word,
        )
        match await window.admit(admission):
            case Queued():
                self.metrics.run_submitted(decision.target, kind.value, request.mode.value)
                return decision.target
            case Rejected(code=code):
                self.metrics.run_rejected(
                    decision.target, kind.value, request.mode.value, code.value
                )
        return None
