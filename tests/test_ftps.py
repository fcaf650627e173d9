"""FTPS machines (`gateway.ftps`) alone, with a recording view of the session."""

from __future__ import annotations

from gateway.codec import Command, Reply
from gateway.config import Config, Tls
from gateway.effects import Effect, StartUpstreamTLS, ToClient
from gateway.ftps import ClientFTPS, UpstreamFTPS, UpstreamStep
from gateway.pairing import Handler, Pairing, ignore


class View:
    """Records what the machine asks of its session; sends go through a real `Pairing`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pairing = Pairing()
        self.sent: list[str] = []
        self.closed: Reply | None = None

    def send(
        self,
        command: Command,
        on_final: Handler,
        *,
        on_preliminary: Handler = ignore,
        owner: object | None = None,
    ) -> list[Effect]:
        self.sent.append(f"{command.verb} {command.arg}".strip())
        return self.pairing.send(command, on_final, on_preliminary=on_preliminary, owner=owner)

    def close(self, last: Reply | None) -> list[Effect]:
        self.closed = last
        return []


def machine(mode: str) -> tuple[UpstreamFTPS, View, list[str]]:
    view = View(Config(upstream=("ftp.test", 21), tls=Tls(upstream=mode)))  # type: ignore[arg-type]
    done: list[str] = []

    def secured() -> list[Effect]:
        done.append("secured")
        return [ToClient(Reply.of(220, "go on"))]

    return UpstreamFTPS(view, name=lambda: "ftp.test", secured=secured), view, done  # type: ignore[arg-type]


def test_auto_negotiates_feat_auth_handshake_pbsz_prot_one_step_at_a_time() -> None:
    ftps, view, done = machine("auto")
    ftps.negotiate(client_tls=False)
    assert (ftps.step, view.sent) == (UpstreamStep.FEAT, ["FEAT"])
    view.pairing.deliver(Reply(211, ("Features:", " AUTH TLS", "End")))
    assert (ftps.step, view.sent[-1]) == (UpstreamStep.AUTH, "AUTH TLS")
    assert view.pairing.deliver(Reply.of(234, "go ahead")) == [StartUpstreamTLS("ftp.test")]
    assert ftps.step is UpstreamStep.HANDSHAKE and not ftps.active
    ftps.handshake_done()
    assert (ftps.step, view.sent[-1], ftps.active) == (UpstreamStep.PBSZ, "PBSZ 0", True)
    view.pairing.deliver(Reply.of(200, "PBSZ=0"))
    assert (ftps.step, view.sent[-1]) == (UpstreamStep.PROT, "PROT P")
    assert view.pairing.deliver(Reply.of(200, "PROT P ok")) == [ToClient(Reply.of(220, "go on"))]
    assert (ftps.step, ftps.protected, done) == (UpstreamStep.IDLE, True, ["secured"])


def test_a_handshake_report_out_of_step_is_ignored() -> None:
    ftps, view, _ = machine("required")
    ftps.negotiate(client_tls=False)
    assert ftps.handshake_done() == []  # AUTH not answered yet
    assert view.sent == ["AUTH TLS"] and not ftps.active


def test_required_tls_refused_closes_and_never_goes_on_in_clear_text() -> None:
    ftps, view, done = machine("required")
    ftps.negotiate(client_tls=False)
    view.pairing.deliver(Reply.of(500, "no TLS here"))
    assert view.closed is not None and view.closed.code == 421
    assert done == []


def test_client_prot_needs_pbsz_after_auth() -> None:
    client = ClientFTPS(Config(tls=Tls(certificate="cert.pem")), implicit=False)
    assert client.prot(Command("PROT", "P")).code == 503
    assert client.auth(Command("AUTH", "TLS")).code == 234
    assert client.prot(Command("PROT", "P")).code == 503
    assert client.pbsz(Command("PBSZ", "0")).code == 200
    assert client.prot(Command("PROT", "P")).code == 200 and client.protected
