"""Forward mode's login to the gateway itself (proxy authentication): pure, no I/O.

Proxy-aware clients log in to a proxy in a few established styles; lftp's
`ftp:proxy-auth-type` names them, and the gateway accepts each:

- user:             USER proxyuser; PASS proxypassword; then USER name@host or OPEN host
- proxy-user@host:  USER proxyuser@host; PASS proxypassword; then USER and PASS for the site
- joined:           USER user@proxyuser@host; PASS password@proxypassword
- joined-acct:      USER user@host proxyuser; PASS password; ACCT proxypassword
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.addresses import UserTarget, parse_user_target


@dataclass(slots=True)
class ProxyLogin:
    """A login to the gateway in progress."""

    style: str  # "user", "proxy-user@host", "joined" or "joined-acct"
    proxy_user: str
    target: UserTarget | None = None
    site_user: str | None = None
    site_password: str | None = None


def begin(arg: str) -> tuple[ProxyLogin, str]:
    """The login that USER `arg` starts, and the text of the 331 that asks for what comes next.
    Raises ClientProtocolError (501) for a malformed host or port."""
    name, space, account = arg.partition(" ")
    if space and "@" in name:
        target = parse_user_target(name)
        assert target is not None
        login = ProxyLogin("joined-acct", account.strip(), target, target.user)
        return login, "Password required."
    target = parse_user_target(arg)
    if target is not None and "@" in target.user:
        site_user, _, proxy_user = target.user.rpartition("@")
        site = UserTarget(site_user, target.host, target.port)
        return ProxyLogin("joined", proxy_user, site, site_user), (
            "Password required: send password@proxy_password."
        )
    if target is not None:
        login = ProxyLogin("proxy-user@host", target.user, target)
        return login, f"Proxy password required for {target.user}."
    return ProxyLogin("user", arg), f"Proxy password required for {arg}."


def split_joined_password(arg: str) -> tuple[str, str] | None:
    """`password@proxypassword` (joined style) as (site password, proxy password), or None.
    The proxy password follows the last "@", so site passwords may contain one."""
    site_password, sep, proxy_password = arg.rpartition("@")
    return (site_password, proxy_password) if sep else None
