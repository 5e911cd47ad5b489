"""The confirm watch: a publisher channel whose oldest publish stays unconfirmed from one
look to the next is replaced; one whose confirms keep coming is left alone."""

from __future__ import annotations

from typing import Any

import pytest

from dispatcher.adapters.amqp.confirms import ConfirmWatch

pytestmark = pytest.mark.unit


class Underlay:
    def __init__(self) -> None:
        self.confirmations: dict[int, Any] = {}


class Channel:
    """The part of a robust channel the watch reads."""

    def __init__(self) -> None:
        self.is_closed = False
        self.underlay = Underlay()

    async def get_underlay_channel(self) -> Underlay:
        return self.underlay


def watching(channel: Channel) -> tuple[ConfirmWatch, list[Any]]:
    renewed: list[Any] = []

    async def renew(stuck: Any) -> None:
        renewed.append(stuck)

    return ConfirmWatch(lambda: channel, renew), renewed  # type: ignore[arg-type, return-value]


async def test_a_publish_left_unconfirmed_from_one_look_to_the_next_renews_the_channel() -> None:
    channel = Channel()
    watch, renewed = watching(channel)
    channel.underlay.confirmations = {7: object(), 8: object()}
    assert [await watch.look(), await watch.look()] == [False, True]
    assert renewed == [channel]
    assert await watch.look() is False  # a new channel is given a whole interval


async def test_confirms_that_keep_coming_leave_the_channel_alone() -> None:
    channel = Channel()
    watch, renewed = watching(channel)
    for oldest in range(1, 6):  # the oldest unconfirmed publish changes at every look
        channel.underlay.confirmations = {oldest: object(), oldest + 1: object()}
        assert await watch.look() is False
    channel.underlay.confirmations = {}
    assert [await watch.look(), await watch.look()] == [False, False]  # nothing waits
    assert renewed == []


async def test_a_closed_or_reopened_channel_is_not_renewed_here() -> None:
    channel = Channel()
    watch, renewed = watching(channel)
    channel.underlay.confirmations = {3: object()}
    assert await watch.look() is False
    channel.underlay = Underlay()  # reopened by the robust connection: tags start again
    channel.underlay.confirmations = {3: object()}
    assert await watch.look() is False
    channel.is_closed = True
    assert [await watch.look(), await watch.look()] == [False, False]
    assert renewed == []
