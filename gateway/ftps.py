"""FTPS (RFC 4217) on both sides of the gateway: pure, no I/O.

The gateway terminates TLS on each side it encrypts (PORT/PASV rewriting is impossible inside TLS
that passes through), so each side has its own state:

- `ClientFTPS`: the gateway as FTPS server: AUTH, PBSZ, PROT and CCC from the client.
- `UpstreamFTPS`: the gateway as FTPS client, negotiating with the upstream in explicit steps,
  FEAT → AUTH TLS → handshake → PBSZ 0 → PROT P, as policy (`tls.upstream`) asks. It never
  falls back to clear text once policy wants TLS.

`gateway.tls` (the shell) builds the TLS contexts; nothing here touches a socket.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from gateway import features
from gateway.codec import Command, Reply
from gateway.config import Config
from gateway.effects import Effect, Log, StartUpstreamTLS
from gateway.events import Event
from gateway.view import SessionView

#: Commands a client may send before AUTH TLS when TLS is required.
BEFORE_TLS = frozenset({"AUTH", "FEAT", "QUIT", "NOOP", "HELP", "SYST"})


class ClientFTPS:
    """The client side's protection state, changed only by the client's commands."""

    def __init__(self, config: Config, *, implicit: bool) -> None:
        self._config = config
        #: The control connection is protected. Implicit FTPS (an ssl: listener): from the start.
        self.active = implicit
        self._pbsz = False
        #: PROT P: new data connections are protected.
        self.protected = False

    def refuses(self, verb: str) -> Reply | None:
        """530 for a command that must wait for AUTH TLS when policy requires TLS."""
        if self._config.tls.client == "required" and not self.active and verb not in BEFORE_TLS:
            return Reply.of(530, "TLS is required on this gateway: send AUTH TLS first.")
        return None

    def auth(self, command: Command) -> Reply:
        """AUTH: 234 when the handshake may start (the shell starts it after the reply)."""
        mechanism = command.arg.strip().upper()
        if not self._config.client_tls_available:
            return Reply.of(502, "TLS is not available on this gateway.")
        if mechanism not in ("TLS", "SSL", "TLS-C", "TLS-P"):
            return Reply.of(504, "Unknown security mechanism; use AUTH TLS.")
        if self.active:
            return Reply.of(503, "TLS is already active.")
        self.active = True
        if mechanism in ("SSL", "TLS-P"):
            # Old clients: AUTH SSL implied protected data (draft-murray-auth-ftp-ssl).
            self._pbsz = self.protected = True
        return Reply.of(234, f"AUTH {mechanism} successful.")

    def pbsz(self, command: Command) -> Reply:
        if not self.active:
            return Reply.of(503, "PBSZ needs AUTH TLS first.")
        self._pbsz = True
        # RFC 4217 section 9: the only buffer size for TLS is 0.
        return Reply.of(200, "PBSZ=0")

    def prot(self, command: Command) -> Reply:
        if not self.active:
            return Reply.of(503, "PROT needs AUTH TLS first.")
        if not self._pbsz:
            return Reply.of(503, "PROT needs PBSZ first.")
        level = command.arg.strip().upper()
        if level not in ("C", "P"):
            code = 536 if level in ("S", "E") else 504
            return Reply.of(code, f"Protection level {level!r} is not supported; use C or P.")
        self.protected = level == "P"
        return Reply.of(200, f"Protection level set to {level}.")

    def ccc(self, command: Command) -> Reply:
        # RFC 4217 section 12.2 makes CCC optional; clear text after login helps nobody here.
        return Reply.of(533, "CCC is refused: the control connection stays encrypted.")


class UpstreamStep(enum.Enum):
    """Where the upstream negotiation is; each step waits for one reply or event."""

    IDLE = "idle"  # not negotiating
    FEAT = "FEAT"  # tls.upstream = auto: does the upstream offer AUTH TLS?
    AUTH = "AUTH TLS"
    HANDSHAKE = "handshake"  # the shell runs the TLS handshake and verifies the certificate
    PBSZ = "PBSZ 0"
    PROT = "PROT P"


class UpstreamFTPS:
    """Brings the upstream control connection to the protection policy asks for, then calls
    `secured` (RFC 4217 sections 4-9)."""

    def __init__(
        self,
        view: SessionView,
        *,
        name: Callable[[], str],
        secured: Callable[[], list[Effect]],
        refused: Callable[[Reply], list[Effect]] | None = None,
    ) -> None:
        self._view = view
        self._name = name
        self._secured = secured
        #: What a refusal that leaves the upstream unusable does (default: close with it).
        self._refused = refused or view.close
        self.step = UpstreamStep.IDLE
        #: The upstream control connection is protected.
        self.active = False
        #: The upstream accepted PROT P: upstream data connections are protected too.
        self.protected = False
        self._optional = False

    def negotiate(self, client_tls: bool) -> list[Effect]:
        """Start from the first step policy needs; `secured` is called at the end."""
        mode = self._view.config.tls.upstream
        if mode == "implicit":
            self.active = True  # TLS started with the connection (port 990 style)
            return self._pbsz()
        if mode == "required" or (mode == "match_client" and client_tls):
            return self._auth(optional=False)
        if mode == "auto":
            self.step = UpstreamStep.FEAT
            return self._view.send(Command("FEAT", ""), self._on_feat)
        return self._done()

    def _on_feat(self, answer: Reply) -> list[Effect]:
        if features.offers_auth_tls(answer):
            return self._auth(optional=True)
        return self._done()

    def _auth(self, *, optional: bool) -> list[Effect]:
        self.step, self._optional = UpstreamStep.AUTH, optional
        return self._view.send(Command("AUTH", "TLS"), self._on_auth)

    def _on_auth(self, answer: Reply) -> list[Effect]:
        if answer.code == 234:
            self.step = UpstreamStep.HANDSHAKE
            return [StartUpstreamTLS(self._name())]
        if self._optional:
            # FEAT listed AUTH TLS, AUTH itself was refused (pure-ftpd built with TLS but run
            # without a certificate does this). Nothing is secured yet and nothing secret was
            # sent: carry on as with a server that never offered TLS.
            log = Log(
                "warn",
                "Upstream offered AUTH TLS in FEAT but refused it ({answer}); "
                "continuing in clear text",
                {"answer": str(answer), "event": Event.UPSTREAM_TLS_REFUSED},
            )
            return [log, *self._done()]
        text = (
            f"The upstream refused TLS ({answer.code} {answer.lines[0]}); "
            "policy does not allow continuing in clear text."
        )
        return self._refused(Reply.of(421, text))

    def handshake_done(self) -> list[Effect]:
        """The shell's handshake succeeded and the certificate was verified."""
        if self.step is not UpstreamStep.HANDSHAKE:
            return []
        self.active = True
        return self._pbsz()

    def _pbsz(self) -> list[Effect]:
        self.step = UpstreamStep.PBSZ
        return self._view.send(Command("PBSZ", "0"), self._on_pbsz)

    def _on_pbsz(self, answer: Reply) -> list[Effect]:
        self.step = UpstreamStep.PROT
        return self._view.send(Command("PROT", "P"), self._on_prot)

    def _on_prot(self, answer: Reply) -> list[Effect]:
        if not answer.positive:
            text = f"The upstream refused data protection: {answer.text}"
            return self._view.close(Reply.of(421, text))
        self.protected = True
        return self._done()

    def _done(self) -> list[Effect]:
        self.step = UpstreamStep.IDLE
        return self._secured()
