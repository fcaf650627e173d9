"""Per-user routing in reverse mode: `[[routes]]` tables and `routes_file`. Pure, no Twisted.

A route sends the sessions of matching login names to one backend or one backend group, and
says which name (and, with a proxy login, which account) the gateway logs in with upstream.
Routes are tried in order, the first match wins; a login name no route matches is refused
with 530 (add a last route with `user = "*"` for a default).

Keys of a route:

- `user`: the login name: exact (`alice`), or a shell pattern (`*@site-b`, `ops-?`), matched
  with `fnmatch.fnmatchcase`, so case counts as it does for most FTP servers' user names.
- `proxy_group`: optional; the proxy user must also be in this directory group (the DN an
  `ldap:` proxy login found them in).
- `backend` or `backend_group`: where the session goes (one of them).
- `upstream_user`: the name sent upstream, a template: `{user}` is the login name as given,
  `{local}` the part before its last `@`, `{domain}` the part after. Default `{user}`.
- `upstream_password`: with a proxy login only: the gateway logs in upstream with
  `upstream_user` and this password, the client never learns either.

A routes file is TOML with `[[routes]]` tables or CSV with a header row naming these keys;
empty CSV cells are unset. A file holding passwords must not be readable by others.
"""

from __future__ import annotations

import csv
import io
import os
import stat
import string
import tomllib
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

KEYS = frozenset(
    {"user", "proxy_group", "backend", "backend_group", "upstream_user", "upstream_password"}
)
_FIELDS = frozenset({"user", "local", "domain"})


class RouteError(ValueError):
    """A route or routes file is invalid; the message is one line saying where and why."""


@dataclass(frozen=True, slots=True)
class Route:
    user: str
    backend: str | None = None
    backend_group: str | None = None
    proxy_group: str | None = None
    upstream_user: str = "{user}"
    upstream_password: str | None = field(default=None, repr=False)

    def matches(self, name: str, groups: frozenset[str]) -> bool:
        if not fnmatchcase(name, self.user):
            return False
        return self.proxy_group is None or self.proxy_group in groups

    def upstream_name(self, name: str) -> str:
        """The name to log in with upstream, from `upstream_user` and the login name."""
        local, at, domain = name.rpartition("@")
        if not at:
            local, domain = name, ""
        return self.upstream_user.format(user=name, local=local, domain=domain)


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a session goes: backend names to choose among, and the upstream login."""

    route: Route
    names: frozenset[str]
    upstream_user: str
    upstream_password: str | None = field(repr=False)


def decide(
    routes: tuple[Route, ...],
    name: str,
    groups: frozenset[str],
    backend_groups: dict[str, frozenset[str]],
) -> Decision | None:
    """The first route matching login `name` (and the proxy user's `groups`), resolved to
    backend names through `backend_groups` (group name to backend names); None: no route."""
    for route in routes:
        if route.matches(name, groups):
            if route.backend is not None:
                names = frozenset({route.backend})
            else:
                assert route.backend_group is not None
                names = backend_groups.get(route.backend_group, frozenset())
            return Decision(route, names, route.upstream_name(name), route.upstream_password)
    return None


def parse_route(table: object, where: str) -> Route:
    """One route from a TOML table or CSV row; raises RouteError naming `where`."""
    values = _route_values(table, where)
    if "user" not in values:
        raise RouteError(f"{where}: a route needs user (a login name or a pattern like *@site)")
    if ("backend" in values) == ("backend_group" in values):
        raise RouteError(f"{where}: a route needs backend or backend_group (one of them)")
    template = _upstream_user(values.get("upstream_user", "{user}"), where)
    if "upstream_password" in values and "upstream_user" not in values:
        raise RouteError(f"{where}: upstream_password needs upstream_user")
    return Route(
        user=values["user"],
        backend=values.get("backend"),
        backend_group=values.get("backend_group"),
        proxy_group=values.get("proxy_group"),
        upstream_user=template,
        upstream_password=values.get("upstream_password"),
    )


def _route_values(table: object, where: str) -> dict[str, str]:
    """The route's known keys with their non-empty string values (stripped, except the
    password, whose spaces may be part of it)."""
    if not isinstance(table, dict):
        raise RouteError(f"{where}: expected a table with user and backend or backend_group")
    unknown = set(table) - KEYS
    if unknown:
        raise RouteError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    values: dict[str, str] = {}
    for key, value in table.items():
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            # A password written without quotes must not reach --check-config or the log.
            shown = "a value of another type" if key == "upstream_password" else repr(value)
            raise RouteError(f"{where}: {key}: expected a string, got {shown}")
        values[key] = value if key == "upstream_password" else value.strip()
    return values


def _upstream_user(template: str, where: str) -> str:
    """The upstream_user template, checked to name only the fields a route can fill."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise RouteError(f"{where}: upstream_user: {e}") from None
    if not fields <= _FIELDS:
        bad = sorted(fields - _FIELDS)[0]
        raise RouteError(
            f"{where}: upstream_user: unknown field {{{bad}}}; use {{user}}, {{local}}, {{domain}}"
        )
    return template


def parse_routes(tables: object, where: str) -> tuple[Route, ...]:
    if not isinstance(tables, list):
        raise RouteError(f"{where}: expected an array of tables ([[routes]])")
    return tuple(parse_route(table, f"{where}[{index}]") for index, table in enumerate(tables, 1))


def load_routes_file(path: str) -> tuple[Route, ...]:
    """Routes from a TOML file (`[[routes]]`) or a CSV file with a header row (by the name's
    ending: .toml or .csv). A file holding upstream passwords that others may read is refused:
    those passwords open backend accounts."""
    where = f"routes_file: {path}"
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read()
    except OSError as e:
        raise RouteError(f"{where}: cannot read: {e.strerror}") from None
    suffix = Path(path).suffix.lower()
    if suffix == ".toml":
        try:
            table = tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise RouteError(f"{where}: not valid TOML: {e}") from None
        unknown = set(table) - {"routes"}
        if unknown:
            raise RouteError(f"{where}: unknown key {sorted(unknown)[0]!r}; expected [[routes]]")
        routes = parse_routes(table.get("routes", []), f"{where}: routes")
    elif suffix == ".csv":
        routes = _parse_csv(data, where)
    else:
        raise RouteError(f"{where}: expected a .toml or .csv file")
    check_private(mode, any(route.upstream_password is not None for route in routes), where)
    return routes


def check_private(mode: int, holds_passwords: bool, where: str) -> None:
    """Refuse a file holding upstream passwords that others may read or write (its `mode`
    from fstat): those passwords open backend accounts, and whoever may write the file may
    send a proxy user to any account. Raises RouteError naming `where`."""
    if holds_passwords and mode & (stat.S_IROTH | stat.S_IWOTH):
        raise RouteError(
            f"{where}: holds upstream passwords but others may read it (mode "
            f"{stat.S_IMODE(mode):04o}); chmod o-rwx it"
        )


def _parse_csv(data: bytes, where: str) -> tuple[Route, ...]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise RouteError(f"{where}: not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    if "user" not in header:
        raise RouteError(f"{where}: the first line must be a header naming user, backend, ...")
    routes = []
    for row in reader:
        line = reader.line_num
        if None in row:
            raise RouteError(f"{where}:{line}: more cells than the header names")
        if not any((value or "").strip() for value in row.values()):
            continue
        routes.append(parse_route(dict(row), f"{where}:{line}"))
    return tuple(routes)
