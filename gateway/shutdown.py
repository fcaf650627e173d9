"""Stopping without losing a transfer: what SIGTERM (systemctl stop, restart, upgrades) does.

twistd answers SIGTERM with `reactor.stop()`, which stops the services before the reactor
ends; a service whose `stopService` returns a Deferred holds the reactor until it fires. This
one uses that to give running transfers `timeouts.shutdown` seconds:

1. The listeners stop accepting (they are stopped alongside this service).
2. Every session is told (`Session.shutdown`): idle ones answer 421 and close at once, ones
   with a transfer let it finish, then answer 421.
3. When the grace period ends, or on a second SIGTERM or SIGINT, the sessions still
   transferring are ended: 426 for the transfer, 421 for the session.

What each session answers is the pure session's decision; only the timing lives here.

The first SIGTERM or SIGINT is taken here too, once the reactor runs, in place of Twisted's own
handlers: those log "Received SIGTERM" from inside the signal handler, and a signal that lands
while the main thread is writing a log line then waits for the log file's lock that very
thread holds (twisted.python.logfile is synchronized with a pure-Python RLock, which a signal
can interrupt between taking the lock and recording its owner): the gateway hung instead of
stopping, until systemd killed it and every transfer with it. Here the handler only hands the
work to the reactor (`callFromThread`, which is safe in a signal handler).
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from gateway.control import ClientControl, GatewayFactory
from gateway.events import Event

_log = Logger(namespace="gateway.shutdown")

#: Seconds the last replies get to reach clients before the connections are cut.
_FLUSH = 5.0


class GracefulShutdown(Service):
    """Holds the reactor's shutdown until every session has ended, at most `grace` seconds
    plus a short flush."""

    def __init__(self, factory: GatewayFactory, grace: float, reactor: Any) -> None:
        self.factory = factory
        self.grace = grace
        self.reactor = reactor
        self._done: Deferred[None] | None = None
        self._timer: Any = None
        self._flush_timer: Any = None
        self._ended_at_once = False
        self._transfers_at_start = 0
        self._aborted = 0

    def startService(self) -> None:
        super().startService()
        # After the reactor has installed its own handlers, which these replace.
        self.reactor.callWhenRunning(self._take_signals)

    def _take_signals(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_first_signal)

    def _on_first_signal(self, signum: int, frame: Any) -> None:
        # Nothing here may log or take a lock (see the module docstring).
        self.reactor.callFromThread(self._stop, signum)

    def _stop(self, signum: int) -> None:
        _log.info(
            "Received {signal}, shutting down.",
            signal=signal.Signals(signum).name,
            event=Event.STOP_REQUESTED,
        )
        # As Twisted's handler does: twistd ends the process with this signal, unless the stop
        # was clean (`_check`).
        self.reactor._exitSignal = signum
        with contextlib.suppress(ReactorNotRunning):  # a second signal before the first acted
            self.reactor.stop()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        done: Deferred[None] = Deferred()
        self._done = done
        sessions = list(self.factory.protocols)
        for protocol in sessions:
            protocol.shutdown(immediate=False)
        transferring = [p for p in self.factory.protocols if not p.ended]
        _log.info(
            "Shutting down: stopped accepting; idle sessions closed: {idle}; running "
            "transfers: {transfers}, given up to {grace:g} s",
            idle=len(sessions) - len(transferring),
            transfers=len(transferring),
            grace=self.grace,
            event=Event.SHUTDOWN_STARTED,
        )
        self._transfers_at_start = len(transferring)
        # A second SIGTERM or SIGINT ends the transfers at once (twistd's own handler would
        # only call reactor.stop() again, which is already under way).
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.factory.on_session_ended = self._check
        if transferring:
            self._timer = self.reactor.callLater(self.grace, self._end_transfers, "grace")
        self._check()
        return done

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._end_transfers, "signal")

    def _end_transfers(self, why: str) -> None:
        if self._done is None or self._done.called or self._ended_at_once:
            return
        self._ended_at_once = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        remaining = [p for p in self.factory.protocols if not p.ended]
        _log.warn(
            "Shutdown: ending {count} transfers with 426 ({why})",
            count=len(remaining),
            why="grace period over" if why == "grace" else "second signal",
            event=Event.SHUTDOWN_FORCED,
        )
        self._aborted = len(remaining)
        for protocol in remaining:
            protocol.shutdown(immediate=True)
        # The replies are queued; a client that does not read them must not hold the exit.
        self._flush_timer = self.reactor.callLater(_FLUSH, self._cut)
        self._check()

    def _cut(self) -> None:
        for protocol in list(self.factory.protocols):
            protocol.transport.abortConnection()  # type: ignore[union-attr]

    def _check(self, _: ClientControl | None = None) -> None:
        done = self._done
        if done is None or done.called or self.factory.protocols:
            return
        for timer in (self._timer, self._flush_timer):
            if timer is not None and timer.active():
                timer.cancel()
        _log.info(
            "Shutdown complete: {finished} transfers ran to their end, {aborted} ended with 426",
            finished=self._transfers_at_start - self._aborted,
            aborted=self._aborted,
            event=Event.SHUTDOWN_COMPLETE,
        )
        # twistd ends the process by re-raising the signal that stopped the reactor (exit
        # status "killed by SIGTERM"); a stop that let every session end as it should is a
        # clean exit, status 0, for supervisors and scripts that check it.
        if getattr(self.reactor, "_exitSignal", None) in (signal.SIGTERM, signal.SIGINT):
            self.reactor._exitSignal = None
        done.callback(None)
