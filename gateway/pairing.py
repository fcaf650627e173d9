"""Which upstream reply answers which command the gateway sent: pure, no I/O.

RFC 959 section 4.2: a server answers the commands of one control connection in order, each
with any number of preliminary (1xx) replies and then exactly one final reply. `Pairing` keeps
that line: every command goes out together with the handler of its final reply (and of its 1xx
replies, where the sender wants them), and replies are delivered to the oldest command still
waiting. No handler needs to check whether a reply is final, or whether the work it belonged to
still exists:

- a final reply goes to `on_final`, once, and the command leaves the line;
- a 1xx reply goes to `on_preliminary`, or nowhere if the sender did not ask for it;
- `drop(owner)` keeps the commands of an abandoned piece of work (an aborted transfer) in the
  line, so their replies are still consumed in order, but delivers those replies to nobody.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gateway.codec import Command, Reply
from gateway.effects import Effect, ToUpstream

Handler = Callable[[Reply], list[Effect]]


#: Replies the upstream may owe at once. Commands go upstream one at a time, a transfer adding
#: a few of its own (EPSV or PASV, PORT, REST) and ABOR one more; only ABOR is sent without
#: waiting, so a client aborting transfer after transfer while the upstream answers (or reads)
#: nothing would have the gateway send, and remember, commands without bound.
MAX_OWED_REPLIES = 32


def ignore(answer: Reply) -> list[Effect]:
    """The handler of a reply nobody needs (the reply to ABOR, to a dropped command)."""
    return []


@dataclass(slots=True)
class _Waiting:
    number: int  # how many commands had been sent when this one was
    on_final: Handler
    on_preliminary: Handler
    owner: object | None


class Pairing:
    """The commands sent upstream that still wait for their final reply, oldest first."""

    def __init__(self) -> None:
        #: Commands sent so far. A reply read before a command went out cannot answer it, so
        #: each waiting command remembers its number (see `deliver`'s `horizon`).
        self.sent = 0
        #: Replies delivered so far (1xx included): a mark that moves with every reply.
        self.delivered = 0
        self._waiting: deque[_Waiting] = deque()

    def send(
        self,
        command: Command,
        on_final: Handler,
        *,
        on_preliminary: Handler = ignore,
        owner: object | None = None,
    ) -> list[Effect]:
        """Send `command` upstream; its replies go to the handlers given here."""
        self.sent += 1
        self._waiting.append(_Waiting(self.sent, on_final, on_preliminary, owner))
        return [ToUpstream(command)]

    def expect(self, on_final: Handler, *, on_preliminary: Handler = ignore) -> None:
        """Wait for a reply no command asked for: the server's greeting (RFC 959 section 5.4,
        "connection establishment")."""
        self._waiting.append(_Waiting(self.sent, on_final, on_preliminary, None))

    def deliver(self, answer: Reply, horizon: int | None = None) -> list[Effect] | None:
        """Hand `answer` to the handler of the oldest waiting command, or return None when no
        command can own it (an unsolicited reply). `horizon` is `sent` plus one as it was when
        the reply's bytes were read: the reply cannot answer a command sent after that."""
        if not self._waiting or (horizon is not None and self._waiting[0].number >= horizon):
            return None
        waiting = self._waiting[0]
        self.delivered += 1
        if not answer.final:
            return waiting.on_preliminary(answer)
        self._waiting.popleft()
        return waiting.on_final(answer)

    def drop(self, owner: object) -> None:
        """The work `owner` stands for is abandoned: its commands' replies reach nobody."""
        for waiting in self._waiting:
            if waiting.owner is owner:
                waiting.on_final = waiting.on_preliminary = ignore

    def clear(self) -> None:
        """The upstream connection is gone (or was never kept): nothing will be answered."""
        self._waiting.clear()

    @property
    def waiting(self) -> bool:
        """Whether some command (or the greeting) still waits for its final reply."""
        return bool(self._waiting)

    @property
    def owed(self) -> int:
        """How many final replies the upstream owes (the greeting included)."""
        return len(self._waiting)

    @property
    def horizon(self) -> int:
        """The horizon of bytes read now (see `deliver`)."""
        return self.sent + 1
