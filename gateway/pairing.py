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
  line, so their replies are still consumed in order, but delivers those replies to nobody;
- `abort(owner)` drops them and sends ABOR. A server whose transfer had not started yet may
  answer ABOR alone, with 225, and never give the transfer command a final reply (pyftpdlib
  does, while it waits for the data connection). 225 answers nothing but ABOR (RFC 959 section
  5.4), so a 225 that reaches an aborted command ends that command's wait too.
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
    #: The command was aborted: a 225 is ABOR's reply, and this command will get none.
    aborted: bool = False


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
        skip = 0
        if answer.code == 225:
            while skip < len(self._waiting) - 1 and self._waiting[skip].aborted:
                skip += 1
        if len(self._waiting) <= skip or (
            horizon is not None and self._waiting[skip].number >= horizon
        ):
            return None
        for _ in range(skip):
            self._waiting.popleft()
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

    def abort(self, owner: object) -> list[Effect]:
        """ABOR the work `owner` stands for (RFC 959 section 4.1.3): its commands' replies,
        and ABOR's own, reach nobody."""
        self.drop(owner)
        for waiting in self._waiting:
            if waiting.owner is owner:
                waiting.aborted = True
        return self.send(Command("ABOR", ""), ignore)

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
