"""Per-user routes: matching, name rewriting, parsing of [[routes]] and routes files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.routes import Route, RouteError, decide, load_routes_file, parse_route, parse_routes

GROUPS = {"east": frozenset({"e1", "e2"}), "west": frozenset({"w1"})}
ROUTES = (
    Route("alice", backend="w1"),
    Route("*@site-b", backend_group="east", upstream_user="{local}"),
    Route("ops-?", backend="e1", proxy_group="cn=ops,dc=example"),
    Route("svc", backend="w1", upstream_user="archive", upstream_password="s3cret"),
)


@pytest.mark.parametrize(
    ("name", "groups", "names", "upstream_user"),
    [
        ("alice", frozenset(), {"w1"}, "alice"),
        ("alice@site-b", frozenset(), {"e1", "e2"}, "alice"),
        ("bob@x@site-b", frozenset(), {"e1", "e2"}, "bob@x"),
        ("ops-1", frozenset({"cn=ops,dc=example"}), {"e1"}, "ops-1"),
        ("svc", frozenset(), {"w1"}, "archive"),
    ],
)
def test_first_matching_route_decides(
    name: str, groups: frozenset[str], names: set[str], upstream_user: str
) -> None:
    decision = decide(ROUTES, name, groups, GROUPS)
    assert decision is not None
    assert decision.names == names
    assert decision.upstream_user == upstream_user


@pytest.mark.parametrize(
    ("name", "groups"),
    [
        ("Alice", frozenset()),  # case counts
        ("alice@site-bb", frozenset()),
        ("ops-1", frozenset()),  # not in the required group
        ("ops-12", frozenset({"cn=ops,dc=example"})),
        ("", frozenset()),
        # Pattern characters in a login name are literal: they match only themselves.
        ("*", frozenset()),
        ("alic?", frozenset()),
        ("[a]lice", frozenset()),
        ("svc*", frozenset()),
        ("alice@site-b@evil", frozenset()),
        ("alice@site-b\x00", frozenset()),
    ],
)
def test_names_no_route_matches_get_none(name: str, groups: frozenset[str]) -> None:
    assert decide(ROUTES, name, groups, GROUPS) is None


def test_order_decides_between_overlapping_routes() -> None:
    routes = (Route("*@site-b", backend="e1"), Route("*", backend="w1"))
    first = decide(routes, "x@site-b", frozenset(), GROUPS)
    default = decide(routes, "x@site-c", frozenset(), GROUPS)
    assert first is not None and first.names == {"e1"}
    assert default is not None and default.names == {"w1"}


def test_password_is_carried_but_never_shown() -> None:
    decision = decide(ROUTES, "svc", frozenset(), GROUPS)
    assert decision is not None and decision.upstream_password == "s3cret"
    assert "s3cret" not in repr(decision) and "s3cret" not in repr(ROUTES[3])


def test_domain_field() -> None:
    route = Route("*", backend="w1", upstream_user="{domain}-{local}")
    assert route.upstream_name("alice@b") == "b-alice"
    assert route.upstream_name("alice") == "-alice"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"backend": "w1"}, "needs user"),
        ({"user": "a"}, "needs backend or backend_group"),
        ({"user": "a", "backend": "w1", "backend_group": "east"}, "needs backend or"),
        ({"user": "a", "backend": "w1", "colour": "red"}, "unknown key 'colour'"),
        ({"user": "a", "backend": 3}, "backend: expected a string"),
        ({"user": "a", "backend": "w1", "upstream_user": "{uid}"}, "unknown field {uid}"),
        ({"user": "a", "backend": "w1", "upstream_user": "{user.__class__}"}, "unknown field"),
        ({"user": "a", "backend": "w1", "upstream_user": "{"}, "upstream_user:"),
        ({"user": "a", "backend": "w1", "upstream_password": "p"}, "needs upstream_user"),
        ("alice", "expected a table"),
    ],
)
def test_bad_routes_are_refused_with_where_and_why(table: object, message: str) -> None:
    with pytest.raises(RouteError) as error:
        parse_route(table, "routes[2]")
    assert str(error.value).startswith("routes[2]: ")
    assert message in str(error.value)


def test_routes_must_be_an_array() -> None:
    with pytest.raises(RouteError, match="array of tables"):
        parse_routes({"user": "a"}, "routes")


def test_toml_routes_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(
        '[[routes]]\nuser = "*@site-b"\nbackend_group = "east"\nupstream_user = "{local}"\n'
        '[[routes]]\nuser = "*"\nbackend = "w1"\n'
    )
    routes = load_routes_file(str(path))
    assert routes == (
        Route("*@site-b", backend_group="east", upstream_user="{local}"),
        Route("*", backend="w1"),
    )


def test_csv_routes_file_with_empty_cells_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "routes.csv"
    path.write_text(
        "user,backend,backend_group,upstream_user\n"
        "*@site-b,,east,{local}\n"
        "\n"
        '"bob, the builder",w1,,\n'
    )
    assert load_routes_file(str(path)) == (
        Route("*@site-b", backend_group="east", upstream_user="{local}"),
        Route("bob, the builder", backend="w1"),
    )


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("r.csv", "backend,user\nw1\n", "r.csv:2: a route needs user"),
        ("r.csv", "who,backend\na,w1\n", "the first line must be a header"),
        ("r.csv", "user,backend\na,w1,extra\n", "r.csv:2: more cells"),
        ("r.csv", "user,backend,x\na,w1,1\n", "unknown key 'x'"),
        ("r.toml", "[[routes]]\nuser = 'a'\n", "routes[1]: a route needs backend"),
        ("r.toml", "routes = [\n", "not valid TOML"),
        ("r.toml", "[[route]]\nuser = 'a'\n", "unknown key 'route'"),
        ("r.json", "[]", "expected a .toml or .csv file"),
    ],
)
def test_bad_routes_files(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(RouteError) as error:
        load_routes_file(str(path))
    assert str(error.value).startswith(f"routes_file: {path}")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_routes_file(tmp_path: Path) -> None:
    with pytest.raises(RouteError, match="cannot read: No such file"):
        load_routes_file(str(tmp_path / "none.csv"))


@pytest.mark.parametrize(("mode", "refused"), [(0o600, False), (0o640, False), (0o644, True)])
def test_a_file_with_passwords_must_not_be_world_readable(
    tmp_path: Path, mode: int, refused: bool
) -> None:
    path = tmp_path / "routes.csv"
    path.write_text("user,backend,upstream_user,upstream_password\nsvc,w1,archive,pw\n")
    os.chmod(path, mode)
    if refused:
        with pytest.raises(RouteError, match=r"others may read it \(mode 0644\); chmod o-rwx"):
            load_routes_file(str(path))
    else:
        assert load_routes_file(str(path))[0].upstream_password == "pw"


def test_a_file_without_passwords_may_be_world_readable(tmp_path: Path) -> None:
    path = tmp_path / "routes.csv"
    path.write_text("user,backend\n*,w1\n")
    os.chmod(path, 0o644)
    assert load_routes_file(str(path)) == (Route("*", backend="w1"),)


@pytest.mark.parametrize("value", [987654321, 12.5, True, ["s3cret-list"]])
def test_a_password_of_the_wrong_type_is_refused_without_showing_it(
    tmp_path: Path, value: object
) -> None:
    """A route password written without quotes (a number, a boolean) is refused: the message
    (printed by --check-config, logged by a reload) names the key but never its value."""
    shown = repr(value)
    with pytest.raises(RouteError) as refused:
        parse_route(
            {"user": "a", "backend": "w1", "upstream_user": "svc", "upstream_password": value},
            "routes[1]",
        )
    assert "upstream_password: expected a string" in str(refused.value)
    assert shown not in str(refused.value) and "s3cret" not in str(refused.value)
    path = tmp_path / "routes.toml"
    path.write_text(
        "[[routes]]\nuser = 'a'\nbackend = 'w1'\nupstream_user = 'svc'\n"
        "upstream_password = 987654321\n"
    )
    path.chmod(0o600)
    with pytest.raises(RouteError) as refused:
        load_routes_file(str(path))
    assert "987654321" not in str(refused.value)
