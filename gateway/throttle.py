"""Bandwidth limits in the relays: a transfer reads only what its buckets grant.

`gateway.rates` does the arithmetic; this module puts it on the reactor. A `Pacer` hands a
relay the bytes it may read now, and when nothing is granted it schedules one wake-up
(`callLater`) for when the buckets will have refilled: the relay stops reading in between, so
a throttled transfer costs no CPU while it waits and holds no more than one grant in memory.

The copy relay reads through Twisted's transports: `ThrottledSource` stands between the
sink (the consumer) and the source transport (the producer). The source reads only while
both the sink wants bytes and the buckets allow them, and each read asks the socket for at
most what is left of the grant (the transport's `bufferSize` is its read size), so the relay
never reads more than it may forward. The spliced relay asks its `Pacer` before every splice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from zope.interface import implementer

from gateway.rates import Draw


class Pacer:
    """Grants for one transfer, and one scheduled `wake` when the buckets are empty."""

    __slots__ = ("_clock", "_draw", "_timer", "_wake")

    def __init__(self, draw: Draw, clock: IReactorTime, wake: Callable[[], None]) -> None:
        self._draw = draw
        self._clock = clock
        self._wake = wake
        self._timer: IDelayedCall | None = None

    def allowance(self) -> int:
        """Bytes the relay may read now. 0 means stop reading: `wake` is called once the
        buckets should have refilled (the relay then asks again)."""
        draw = self._draw
        if draw.closed:
            return 0
        if draw.outstanding == 0 and self._timer is None:
            draw.grant()
        if draw.outstanding == 0 and self._timer is None:
            self._timer = self._clock.callLater(draw.wait(), self._woken)
        return draw.outstanding

    def moved(self, count: int) -> int:
        """`count` bytes were read; returns what is left of the current grant."""
        return self._draw.moved(count)

    def _woken(self) -> None:
        self._timer = None
        self._wake()

    def stop(self) -> None:
        """The transfer ended: no more wake-ups, and unread grants go back to the buckets."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._draw.close()


@implementer(IPushProducer)
class ThrottledSource:
    """The producer a sink sees in place of a throttled source transport.

    The transport reads while the sink has not paused it and the pacer allows; either one
    pausing stops it, and only both together resume it.
    """

    def __init__(self, transport: Any, draw: Draw, clock: IReactorTime) -> None:
        self._transport = transport
        self._pacer = Pacer(draw, clock, self._go)
        self._held = False  # the sink paused us
        self._stopped = False

    def pauseProducing(self) -> None:
        self._held = True
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._held = False
        self._go()

    def stopProducing(self) -> None:
        self.stop()
        self._transport.stopProducing()

    def received(self, count: int) -> None:
        """The source delivered `count` bytes (already forwarded to the sink)."""
        if self._stopped:
            return
        # A spent grant is renewed at once if the buckets allow: no pause between grants.
        left = self._pacer.moved(count) or self._pacer.allowance()
        if left:
            self._transport.bufferSize = left
        else:
            self._transport.pauseProducing()  # until the pacer wakes `_go`

    def stop(self) -> None:
        self._stopped = True
        self._pacer.stop()

    def _go(self) -> None:
        if self._held or self._stopped:
            return
        allowed = self._pacer.allowance()
        if not allowed:
            self._transport.pauseProducing()
            return
        # tcp.Connection.doRead asks the socket for at most bufferSize bytes per wake-up.
        self._transport.bufferSize = allowed
        self._transport.resumeProducing()
