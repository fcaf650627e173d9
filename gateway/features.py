"""FEAT (RFC 2389) on both sides of the gateway: pure functions, no I/O.

The gateway terminates TLS and owns the data channel on each side, so the feature list a client
sees is the upstream's, minus what the gateway cannot relay, plus what the gateway itself
provides.
"""

from __future__ import annotations

from gateway.codec import Reply

#: FEAT lines the gateway does not relay: TLS is the gateway's own on each side (passing it
#: through would blind the PORT/PASV translation), and it does not speak RFC 1639's long
#: addresses.
HIDDEN = ("AUTH", "PBSZ", "PROT", "CCC", "LPSV", "LPRT", "SPSV")
#: Data-channel features the gateway always provides to the client (RFC 2428).
OWN = ("EPRT", "EPSV")
#: Features the gateway provides when clients may use TLS (RFC 4217 section 6).
TLS = ("AUTH TLS", "AUTH SSL", "PBSZ", "PROT")


def for_client(upstream: Reply | None, tls: bool) -> Reply:
    """The FEAT reply the client sees: the upstream's features (None before an upstream is
    chosen) minus those the gateway cannot relay, plus the ones it provides itself."""
    features: list[str] = []
    if upstream is not None and upstream.code == 211:
        for line in upstream.lines[1:-1] if len(upstream.lines) > 2 else ():
            name = line.strip().split(" ", 1)[0].upper()
            if name and name not in HIDDEN and name not in OWN:
                features.append(" " + line.strip())
    features += [" " + name for name in OWN]
    if tls:
        features += [" " + name for name in TLS]
    return Reply(211, ("Features:", *features, "End"))


def offers_auth_tls(answer: Reply) -> bool:
    """Whether an upstream's FEAT reply lists AUTH TLS (RFC 4217 section 6)."""
    return answer.positive and any(
        line.strip().upper().startswith("AUTH") and "TLS" in line.upper()
        for line in answer.lines[1:]
    )
