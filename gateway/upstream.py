"""The upstream control connection as the session sees it: pure, no I/O.

`Upstream` knows who the upstream is, pairs its replies with the commands sent
(`gateway.pairing`), takes its greeting and has it secured (`gateway.ftps.UpstreamFTPS`), and
decides what a reply that breaks the rules means: 421 ends the session (RFC 959 section 4.2), a
reply nobody asked for is logged and dropped, a malformed 227/229 ends the transfer or the
session, and a command left unanswered for `timeouts.reply` ends the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gateway.addresses import HostPort
from gateway.codec import Reply
from gateway.effects import (
    ConnectUpstream,
    Effect,
    Log,
    RetryBackend,
    StartUpstreamTLS,
    ToClient,
)
from gateway.errors import ProtocolError
from gateway.events import Event
from gateway.ftps import UpstreamFTPS
from gateway.login import Login
from gateway.pairing import Pairing
from gateway.routelogin import RouteLogin
from gateway.transfer import TransferDriver
from gateway.view import Phase, SessionView

#: Unsolicited upstream replies a session tolerates (a server that answers an over-long line
#: twice sends one now and then); past this the upstream is flooding and the session ends.
MAX_UNSOLICITED_REPLIES = 8


class UpstreamHost(SessionView, Protocol):
    """What `Upstream` needs of its session beyond `SessionView`."""

    @property
    def phase(self) -> Phase: ...

    @property
    def forward(self) -> bool: ...

    @property
    def fixed_upstream(self) -> tuple[str, int] | None: ...

    @property
    def own_login(self) -> bool: ...

    @property
    def login(self) -> Login | RouteLogin: ...

    @property
    def transfers(self) -> TransferDriver: ...

    @property
    def client_tls(self) -> bool: ...

    def enter(self, phase: Phase) -> None: ...

    def serve_queue(self) -> list[Effect]: ...


class Upstream:
    """See the module docstring."""

    def __init__(self, host: UpstreamHost, pairing: Pairing) -> None:
        self._host = host
        self.pairing = pairing
        self.ftps = self._new_ftps()
        self.peer: HostPort | None = None
        self.local: HostPort | None = None
        #: Reverse mode: the name of the backend connected, for the logs.
        self.backend: str | None = None
        #: Reverse mode: the upstream's greeting, shown once the upstream side is secured
        #: (with `tls.upstream = "auto"` it is shown at once, never kept here).
        self._greeting: Reply | None = None
        #: The phase to return to after a negotiation a client's AUTH TLS started.
        self._resume: Phase | None = None
        self._unsolicited = 0
        #: Why the last backend could not be used (`_unusable`): the 421 when none is left.
        self._unusable_reply: Reply | None = None

    def _new_ftps(self) -> UpstreamFTPS:
        return UpstreamFTPS(
            self._host, name=self._tls_name, secured=self.secured, refused=self._tls_refused
        )

    # ------------------------------------------------------------ the connection itself

    def _tls_name(self) -> str:
        """The name the upstream's certificate must carry."""
        if self._host.config.tls.upstream_name:
            return self._host.config.tls.upstream_name
        if self._host.fixed_upstream is not None:
            return self._host.fixed_upstream[0]
        # Reverse mode's backends always carry a name (`Config.for_backend`).
        assert isinstance(self._host.login, Login) and self._host.login.target is not None
        return self._host.login.target.host

    def connect(self, host: str, port: int) -> list[Effect]:
        """Open the connection to `host`, an address policy approved (or the configured name)."""
        if self._host.config.tls.upstream != "implicit":
            return [ConnectUpstream(host, port)]
        return [ConnectUpstream(host, port, implicit_tls=True, tls_name=self._tls_name())]

    def connect_failed(self, reason: str) -> list[Effect]:
        log = Log(
            "warn",
            "Cannot connect to the upstream: {reason}",
            {"reason": reason, "event": Event.UPSTREAM_CONNECT_FAILED},
        )
        if self._host.forward:
            assert isinstance(self._host.login, Login)
            return [log, *self._host.login.connect_failed(reason)]
        last = self._unusable_reply  # no other backend after one that could not be used
        reply = last or Reply.of(421, f"Upstream server unavailable: {reason}.")
        return [log, *self._host.close(reply)]

    def tls_failed(self, reason: str) -> list[Effect]:
        if self._host.config.tls.upstream == "auto" and "certificate" in reason:
            # An administrator meets this first with a self-signed upstream: name the fix.
            reason += (
                "; to trust it set tls.upstream_ca_file or tls.upstream_fingerprint, "
                'or set tls.upstream = "off" to use clear text'
            )
        log = Log(
            "warn",
            "TLS to upstream {peer} failed: {reason}",
            {"peer": str(self.peer), "reason": reason, "event": Event.UPSTREAM_TLS_FAILED},
        )
        text = f"Cannot secure the connection to the upstream: {reason}."
        return [log, *self._unusable(reason, Reply.of(421, text))]

    def _tls_refused(self, reply: Reply) -> list[Effect]:
        """The upstream refused AUTH TLS that policy requires (`UpstreamFTPS`)."""
        log = Log(
            "warn",
            "TLS to upstream {peer} refused: {text}",
            {"peer": str(self.peer), "text": reply.text, "event": Event.UPSTREAM_TLS_FAILED},
        )
        return [log, *self._unusable(reply.text, reply)]

    def _unusable(self, reason: str, reply: Reply) -> list[Effect]:
        """This upstream cannot be used. In reverse mode, while its greeting is still held
        (TLS required: the client has seen nothing yet), another backend can serve the session
        unseen, as when a backend does not greet (`gateway.balancer`); otherwise the session
        ends with `reply`."""
        if self._greeting is None or self.backend is None or self._host.own_login:
            return self._host.close(reply)
        self.pairing.clear()
        self.forget()
        self.ftps = self._new_ftps()
        self._greeting = None
        self._unsolicited = 0
        self.backend = None
        self._host.enter(Phase.GREETING)
        self._unusable_reply = reply
        return [RetryBackend(reason)]

    def failed(self, error: ProtocolError) -> list[Effect]:
        return [
            Log(
                "warn",
                "Upstream protocol error: {error}",
                {"error": str(error), "event": Event.UPSTREAM_PROTOCOL_ERROR},
            ),
            *self._host.close(Reply.of(421, f"Upstream server error: {error}")),
        ]

    def lost(self) -> list[Effect]:
        if self._host.phase is Phase.CLOSING:
            return self._host.close(None)  # the QUIT was answered by closing
        return self._host.close(Reply.of(421, "Upstream server closed the connection."))

    # ------------------------------------------------------------ greeting and securing

    def connected(self, local: HostPort, peer: HostPort) -> list[Effect]:
        self.local, self.peer = local, peer
        self.pairing.expect(self._on_greeting, on_preliminary=self._on_early_greeting)
        if self.backend is None or self.backend == str(peer):
            fields = {"peer": str(peer), "event": Event.UPSTREAM_OPENED}
            return [Log("info", "Connected to upstream {peer}", fields)]
        return [
            Log(
                "info",
                "Connected to upstream {peer}, backend {backend}",
                {"peer": str(peer), "backend": self.backend, "event": Event.UPSTREAM_OPENED},
            )
        ]

    def forget(self) -> None:
        """The upstream chosen is refused or gone (forward mode: the client may choose again)."""
        self.pairing.clear()
        self.peer = self.local = None

    def _on_early_greeting(self, answer: Reply) -> list[Effect]:
        # Reverse mode shows a 120 "ready in n minutes" as it comes.
        return [] if self._host.own_login else [ToClient(answer)]

    def _on_greeting(self, answer: Reply) -> list[Effect]:
        if self._host.own_login:
            if not answer.positive:
                return self._host.login.greeted(answer)
        elif not answer.positive:
            return self._host.close(answer)
        elif self._host.config.tls.upstream == "auto":
            # Reverse mode, opportunistic TLS: the client sees the upstream's greeting as its
            # own at once, while FEAT asks whether the upstream offers TLS. The client's
            # commands wait in the queue until the upstream side is secured (or found not to
            # offer TLS), so USER and PASS still never go out before that, and the FEAT round
            # trip overlaps the client's own instead of delaying every session's start.
            self._host.enter(Phase.UPSTREAM_TLS)
            return [ToClient(answer), *self.ftps.negotiate(client_tls=self._host.client_tls)]
        else:
            # Reverse mode with TLS required (or following the client): the greeting waits
            # until the upstream side is secured, so a client never sees a server it cannot
            # use, and its USER and PASS never go out in clear text.
            self._greeting = answer
        self._host.enter(Phase.UPSTREAM_TLS)
        return self.ftps.negotiate(client_tls=self._host.client_tls)

    def follow_client(self) -> list[Effect]:
        """`tls.upstream = match_client`: the client just sent AUTH TLS, so the upstream
        follows it into TLS, if it is connected and not protected yet; client commands wait
        until it is."""
        if (
            self._host.config.tls.upstream != "match_client"
            or self.peer is None
            or self.ftps.active
        ):
            return []
        self._resume = self._host.phase
        self._host.enter(Phase.UPSTREAM_TLS)
        return self.ftps.negotiate(client_tls=True)

    def secured(self) -> list[Effect]:
        """The upstream control connection is as secure as policy wants: go on."""
        resume, self._resume = self._resume, None
        if resume is not None:
            self._host.enter(resume)  # a client's AUTH TLS started the negotiation
            return self._host.serve_queue()
        if self._host.own_login:
            return self._host.login.upstream_ready()
        self._host.enter(Phase.LOGIN)
        greeting, self._greeting = self._greeting, None
        shown = [] if greeting is None else [ToClient(greeting)]  # None: shown already
        return [*shown, *self._host.serve_queue()]

    # ------------------------------------------------------------------------ replies

    def replies(self, replies: Sequence[Reply]) -> list[Effect]:
        """Replies framed from one read of the connection. None of them can answer a command
        sent after the read (the horizon), and once one of them started TLS, the rest came in
        clear text from before the handshake: RFC 4217 section 4 says they are not from the
        TLS peer, so they are dropped."""
        horizon = self.pairing.horizon
        effects: list[Effect] = []
        for answer in replies:
            step = self.reply(answer, horizon)
            effects += step
            if any(isinstance(effect, StartUpstreamTLS) for effect in step):
                break
        return effects

    def reply(self, answer: Reply, horizon: int | None = None) -> list[Effect]:
        if answer.code == 421 and self._host.phase is not Phase.CLOSING:
            # RFC 959 section 4.2: 421 means the server is closing the control connection.
            return self._host.close(answer)
        try:
            effects = self.pairing.deliver(answer, horizon)
        except ProtocolError as e:
            # A reply the gateway must understand (227, 229) was malformed.
            fields = {"error": e.message, "event": Event.UPSTREAM_PROTOCOL_ERROR}
            log = Log("warn", "Bad upstream reply: {error}", fields)
            if self._host.transfers.current is not None:
                text = f"Cannot open data connection: {e.message}"
                return [log, *self._host.transfers.fail(Reply.of(425, text))]
            return [log, *self._host.close(Reply.of(421, f"Upstream server error: {e.message}"))]
        if effects is None:
            return self._unsolicited_reply(answer)
        return effects

    def _unsolicited_reply(self, answer: Reply) -> list[Effect]:
        """A reply no command asked for: dropped. The first is logged, the rest counted (the
        count is logged when the session ends), and a flood ends the session with 421."""
        self._unsolicited += 1
        if self._unsolicited > MAX_UNSOLICITED_REPLIES:
            text = "Upstream server error: too many unsolicited replies."
            return self._host.close(Reply.of(421, text))
        if self._unsolicited > 1:
            return []
        fields = {"reply": str(answer.code), "event": Event.UNSOLICITED_REPLY}
        return [Log("warn", "Unsolicited upstream reply {reply}", fields)]

    def unsolicited_summary(self) -> list[Effect]:
        """The session ends: how many unsolicited replies there were, if more than one."""
        if self._unsolicited <= 1:
            return []
        fields = {"count": self._unsolicited, "event": Event.UNSOLICITED_REPLIES}
        return [Log("warn", "Upstream sent {count} unsolicited replies in all", fields)]

    @property
    def awaiting_reply(self) -> int | None:
        """While the session waits for the upstream to answer, a mark that changes with every
        upstream reply; None when no wait needs `timeouts.reply`: nothing is asked, or a
        transfer's data side is under way after its 1xx (bounded by `timeouts.data_connect` and
        `timeouts.stall` until the relay's outcome is known, then by this timer again)."""
        if self._host.phase is Phase.CLOSED or not self.pairing.waiting:
            return None
        transfer = self._host.transfers.current
        if transfer is not None and transfer.data_under_way:
            return None
        return self.pairing.delivered

    def reply_timed_out(self) -> list[Effect]:
        """The upstream left a command unanswered for `timeouts.reply` seconds: a transfer
        ends with 426, anything else ends the session with 421 (221 after QUIT)."""
        seconds = f"{self._host.config.timeouts.reply:g}"
        log = Log(
            "warn",
            "Upstream {peer} sent no reply within {seconds} seconds",
            {"peer": str(self.peer), "seconds": seconds, "event": Event.REPLY_TIMEOUT},
        )
        if self._host.phase is Phase.CLOSING:
            return [log, *self._host.close(Reply.of(221, "Goodbye."))]
        if self._host.transfers.current is not None:
            text = f"Transfer aborted: the upstream server sent no reply within {seconds} seconds."
            return [log, *self._host.transfers.give_up(Reply.of(426, text))]
        text = f"The upstream server sent no reply within {seconds} seconds; closing."
        return [log, *self._host.close(Reply.of(421, text))]
