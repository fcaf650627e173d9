"""Why a session ends before QUIT: pure, no I/O.

A session also ends when a timer runs out (`timeouts.login`, `timeouts.idle`, `timeouts.reply`),
when the gateway stops, when a peer leaves its control connection unread, or when the upstream
leaves so many commands unanswered that sending on would only pile them up. `Endings` decides
whether each of those still counts (an expired timer may be stale) and with which reply the
session ends: 421 for the session (RFC 959 section 4.2), 426 for a transfer cut short.
"""

from __future__ import annotations

from typing import Protocol

from gateway.codec import Reply
from gateway.effects import Effect, Log, Side
from gateway.events import Event
from gateway.view import SessionView

#: RFC 959 section 4.2: 421 when the service is shutting down.
SHUTDOWN_TEXT = "Service shutting down."

#: Texts of the session timers' 421 (RFC 959 section 4.2).
_TIMEOUT_TEXTS = {
    "login": "Login timed out; closing the connection.",
    "idle": "Idle timeout; closing the connection.",
}


class EndingsHost(SessionView, Protocol):
    """What `Endings` needs of its session beyond `SessionView`."""

    @property
    def closed(self) -> bool: ...

    @property
    def logged_in(self) -> bool: ...

    @property
    def transferring(self) -> bool: ...

    @property
    def awaiting_reply(self) -> int | None: ...

    @property
    def owed_replies(self) -> int:
        """How many replies the upstream owes to commands the gateway sent."""
        ...

    def reply_timed_out(self) -> list[Effect]:
        """The upstream left a command unanswered for `timeouts.reply` (`Upstream`)."""
        ...

    def give_up_transfer(self, answer: Reply) -> list[Effect]:
        """Abandon the transfer in progress with `answer` (`TransferDriver.give_up`)."""
        ...


class Endings:
    """See the module docstring."""

    def __init__(self, host: EndingsHost) -> None:
        self._host = host
        #: The gateway is stopping: the command in progress is the last one served.
        self.shutting_down = False

    def timed_out(self, what: str, mark: int | None) -> list[Effect]:
        """See `Session.timed_out`."""
        host = self._host
        if host.closed or (what == "login" and host.logged_in):
            return []
        if what == "idle" and host.transferring:
            return []
        if what == "reply":
            if mark is None or mark != host.awaiting_reply:
                return []
            return host.reply_timed_out()
        return [
            Log("info", "Session {what} timeout", {"what": what, "event": Event.SESSION_TIMEOUT}),
            *host.close(Reply.of(421, _TIMEOUT_TEXTS[what])),
        ]

    def shutdown(self, immediate: bool) -> list[Effect]:
        """See `Session.shutdown`."""
        host = self._host
        if host.closed:
            return []
        self.shutting_down = True
        if not host.transferring:
            return host.close(Reply.of(421, SHUTDOWN_TEXT))
        if not immediate:
            return []
        return host.give_up_transfer(
            Reply.of(426, "Transfer aborted: the gateway is shutting down.")
        )

    def after_answer(self) -> list[Effect]:
        """A command got its final reply while the gateway stops: 421, and close."""
        return self._host.close(Reply.of(421, SHUTDOWN_TEXT))

    def peer_not_reading(self, side: Side, seconds: float) -> list[Effect]:
        """See `Session.peer_not_reading`."""
        who = "client" if side is Side.CLIENT else "upstream"
        fields = {"side": who, "seconds": seconds, "event": Event.CONTROL_NOT_READ}
        text = f"The {who} did not read the control connection for {seconds:g} seconds; closing."
        return [
            Log("warn", "The {side} left its control connection unread for {seconds} s", fields),
            *self._host.close(Reply.of(421, text)),
        ]

    def upstream_not_answering(self) -> list[Effect]:
        """ABOR while the upstream owes `MAX_OWED_REPLIES` replies: it reads or answers nothing,
        and sending on would only pile up commands (RFC 959 section 4.2: 421, closing)."""
        owed = self._host.owed_replies
        fields = {"owed": owed, "event": Event.UPSTREAM_NOT_ANSWERING}
        text = f"The upstream server left {owed} commands unanswered; closing."
        log = Log("warn", "The upstream left {owed} commands unanswered", fields)
        return [log, *self._host.close(Reply.of(421, text))]
