"""Back-pressure between one session's two control connections.

The gateway writes replies to the client and commands to the upstream. A peer that stops
reading would make those writes pile up in the gateway's transport buffers without limit: a
client that pipelines commands and reads nothing while the gateway answers them itself (501
replies echoing a long argument before login), or while the upstream answers (STAT of a large
directory, endless 1yz lines); an upstream that stops reading while the client sends commands.

Twisted's producer/consumer does the work, as for data connections: each control transport
gets a streaming producer registered, and the transport pauses it once its write buffer passes
its bound (64 KiB) and resumes it once the buffer has drained. While the client's buffer is
full the gateway reads neither the client (no new commands, so no new replies) nor the upstream
(whose replies could not be delivered); while the upstream's buffer is full it does not read
the client. A buffer that stays full for `timeout` seconds ends the session (`on_stuck`): a peer
that never reads must not hold a session open for ever.

Closing goes through the flow too (`close`): a transport does not close while a producer is
registered on it (ITransport.loseConnection; a TLS transport does not even start its shutdown),
so the producer is unregistered first, and a peer that reads nothing would still keep the
connection open while the last replies wait in its buffer: it is aborted after `timeout`.

A plain TCP client connection closes in two steps (a "lingering close"): the gateway sends FIN
after its last reply and reads on, dropping whatever the client still sends, until the client
closes too or `LINGER` seconds have passed since the FIN. Closing a socket at once while bytes
the client sent are still unread makes the kernel send a reset (RFC 1122 section 4.2.2.13),
and a reset can destroy the last replies on their way: a client that pipelined commands past
`max_pending_commands` would lose the very 421 that says why the session ended.

One exception: during a TLS handshake the TLS layer holds what the gateway writes (a greeting)
and pauses the producer until the handshake is done, which needs the peer's bytes read. So the
client's own full buffer does not stop reading the client while its handshake runs (nothing is
read as commands before it completes, so nothing more is written either).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from zope.interface import implementer

from gateway.effects import Side
from gateway.sockets import open_plain_tcp

#: Seconds a closing client connection is read (and its bytes dropped) after the gateway's FIN,
#: waiting for the client to close its side; checked this often until the FIN has gone out.
LINGER = 2.0


@implementer(IPushProducer)
class _Full:
    """What one side's transport pauses and resumes: tells `ControlFlow` its buffer is full."""

    def __init__(self, flow: ControlFlow, side: Side) -> None:
        self._flow = flow
        self._side = side

    def pauseProducing(self) -> None:
        self._flow.full(self._side)

    def resumeProducing(self) -> None:
        self._flow.drained(self._side)

    def stopProducing(self) -> None:
        self._flow.drained(self._side)


class ControlFlow:
    """Which control connections the gateway reads, given which write buffers are full."""

    def __init__(
        self, clock: IReactorTime, timeout: float, on_stuck: Callable[[Side], None]
    ) -> None:
        self._clock = clock
        self._timeout = timeout
        self._on_stuck = on_stuck
        self._transports: dict[Side, Any] = {}
        self._full: dict[Side, IDelayedCall] = {}
        self._closing: dict[Side, IDelayedCall] = {}
        self._reading = {Side.CLIENT: True, Side.UPSTREAM: True}
        self._handshaking: set[Side] = set()

    def attach(self, side: Side, transport: Any) -> None:
        """Watch `transport`'s write buffer, and pause its reading when the flow says so."""
        self._transports[side] = transport
        self._reading[side] = True
        transport.registerProducer(_Full(self, side), True)
        self._apply()

    def detach(self, side: Side) -> None:
        """`side`'s connection is gone."""
        self._transports.pop(side, None)
        self._cancel(side)
        self._cancel_close(side)
        self._apply()

    def close(self, side: Side, transport: Any) -> None:
        """Close `side`'s connection once what is buffered for it is sent, or abort it if that
        has not happened within `timeout`."""
        if self._transports.get(side) is transport:
            del self._transports[side]
            self._cancel(side)
            transport.unregisterProducer()
        if side is Side.CLIENT and open_plain_tcp(transport):  # can send FIN and read on
            transport.loseWriteConnection()  # FIN once what is queued has been sent
            transport.resumeProducing()  # read on, to see the client close (bytes dropped)
            self._cancel_close(side)
            deadline = self._clock.seconds() + self._timeout
            self._closing[side] = self._clock.callLater(
                LINGER, self._linger, side, transport, deadline
            )
            return
        transport.loseConnection()
        if side not in self._closing:
            self._closing[side] = self._clock.callLater(self._timeout, self._abort, side, transport)

    def stop(self) -> None:
        """The client connection is gone: no timer of the session may outlive it, except the
        one that aborts an upstream connection still closing (`detach` cancels that one)."""
        for side in list(self._full):
            self._cancel(side)
        self._cancel_close(Side.CLIENT)
        self._transports.clear()

    def tls_started(self, side: Side) -> None:
        self._handshaking.add(side)

    def tls_done(self, side: Side) -> None:
        self._handshaking.discard(side)
        self._apply()

    @property
    def blocked(self) -> frozenset[Side]:
        """The sides whose write buffer is full right now."""
        return frozenset(self._full)

    def full(self, side: Side) -> None:
        if side not in self._full and side in self._transports:
            self._full[side] = self._clock.callLater(self._timeout, self._stuck, side)
            self._apply()

    def drained(self, side: Side) -> None:
        if side in self._full:
            self._cancel(side)
            self._apply()

    def _cancel(self, side: Side) -> None:
        timer = self._full.pop(side, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _cancel_close(self, side: Side) -> None:
        timer = self._closing.pop(side, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _abort(self, side: Side, transport: Any) -> None:
        self._closing.pop(side, None)
        transport.abortConnection()

    def _linger(self, side: Side, transport: Any, deadline: float) -> None:
        """The client has not closed its side `LINGER` seconds after the gateway's close: close
        now if the FIN has gone out, abort if the last replies are still unsent at `deadline`
        (a client that reads nothing), otherwise look again later."""
        self._closing.pop(side, None)
        if transport._writeDisconnected:
            transport.loseConnection()
        elif self._clock.seconds() >= deadline:
            transport.abortConnection()
        else:
            self._closing[side] = self._clock.callLater(
                LINGER, self._linger, side, transport, deadline
            )

    def _stuck(self, side: Side) -> None:
        self._full.pop(side, None)
        self._on_stuck(side)

    def _apply(self) -> None:
        # Any full buffer stops new client commands; a full client buffer also stops upstream
        # replies, which could only be added to it.
        handshaking = self._handshaking & {Side.CLIENT}
        want = {
            Side.CLIENT: not (self._full.keys() - handshaking),
            Side.UPSTREAM: Side.CLIENT not in self._full,
        }
        for side, transport in self._transports.items():
            if want[side] == self._reading[side]:
                continue
            self._reading[side] = want[side]
            if want[side]:
                transport.resumeProducing()
            else:
                transport.pauseProducing()
