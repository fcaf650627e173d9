"""Commands the gateway passes through to the upstream unchanged: pure, no I/O.

Most client commands (CWD, PWD, SIZE, USER and PASS after the upstream is chosen, ...) go to the
upstream as they are, and every reply to them goes back to the client. `PassThrough` sends them
and reads what their final replies tell the session: a 230 means someone logged in (the login
timer stops; the session is ready), a 200 to TYPE sets the representation type the transfer
log records, and a 530 to USER, PASS or ACCT is the upstream refusing a login, worth a line
and a count of its own.
"""

from __future__ import annotations

from typing import Protocol

from gateway.codec import Command, Reply
from gateway.effects import Effect, Log, ToClient
from gateway.events import Event
from gateway.transfer import TransferType
from gateway.view import Phase, SessionView

#: Commands whose 530 is a refused login (RFC 959 section 4.2: 530 not logged in).
_LOGIN_VERBS = ("USER", "PASS", "ACCT")


class PassThroughHost(SessionView, Protocol):
    """What `PassThrough` needs of its session beyond `SessionView`."""

    @property
    def phase(self) -> Phase: ...

    def enter(self, phase: Phase) -> None: ...


class PassThrough:
    """See the module docstring."""

    def __init__(self, host: PassThroughHost) -> None:
        self._host = host
        #: An upstream 230 was passed to the client (the login timer stops counting).
        self.logged_in = False
        #: The USER name of that first 230.
        self.logged_in_as: str | None = None
        #: The representation type in force: ASCII (RFC 959's default) or binary.
        self.transfer_type: TransferType = "a"

    def command(self, command: Command) -> list[Effect]:
        """Send `command` upstream and give the client every reply to it."""
        login = command.verb in _LOGIN_VERBS
        if command.verb == "TYPE":
            on_final = lambda r: self._type_reply(command.arg, r)  # noqa: E731
        else:
            on_final = lambda r: self.reply(r, login=login)  # noqa: E731
        return self._host.send(command, on_final, on_preliminary=lambda r: [ToClient(r)])

    def _type_reply(self, arg: str, answer: Reply) -> list[Effect]:
        if answer.code == 200:
            # RFC 959 section 3.1.1: A (ASCII) or E are text; I and L 8 move bytes as they are.
            self.transfer_type = "a" if arg[:1].upper() in ("A", "E") else "b"
        return self.reply(answer)

    def reply(self, answer: Reply, *, login: bool = False) -> list[Effect]:
        """The upstream's final `answer` to a command passed through: the client's answer;
        `login`: the command was USER, PASS or ACCT."""
        effects: list[Effect] = []
        if login and answer.code == 530:
            refused: dict[str, object] = {
                "upstream": str(self._host.upstream_peer),
                "text": answer.lines[0],
                "event": Event.UPSTREAM_LOGIN_FAILED,
            }
            effects.append(Log("warn", "Upstream {upstream} refused the login: {text}", refused))
        if answer.code == 230 and not self.logged_in:
            self.logged_in = True
            self.logged_in_as = self._host.user
            fields = {"user": self._host.user, "event": Event.LOGGED_IN}
            effects.append(Log("info", "User {user} logged in", fields))
        if answer.code == 230 and self._host.phase is Phase.LOGIN:
            self._host.enter(Phase.READY)
        # The log lines follow the reply: the client need not wait for them to be written.
        return self._host.answer(answer, *effects)
