"""Configuration: the shipped file documents the real defaults; bad values get one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import SETTINGS, Config, ConfigError, build, load_file
from gateway.policy import Rule

SHIPPED = Path(__file__).resolve().parent.parent / "etc" / "ftp-gateway.toml"


def test_shipped_file_states_every_setting_with_its_default() -> None:
    values = load_file(SHIPPED)
    assert set(values) == {setting.key for setting in SETTINGS}
    assert build(values) == Config()


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ({"data.passive_ports": "70000-70001"}, "data.passive_ports: expected 'LOW-HIGH'"),
        ({"data.upstream_mode": "sideways"}, "data.upstream_mode: expected one of"),
        ({"timeouts.idle": "soon"}, "timeouts.idle: expected a number"),
        ({"allow_upstream": ["10.0.0.0/33"]}, "allow_upstream: '10.0.0.0/33' is not an IP network"),
        ({"upstream": "[::1"}, "upstream:"),
        ({"no_such": 1}, "no_such: unknown setting"),
        ({"tls.client": "required"}, "tls.client: 'required' needs tls.certificate"),
        ({"tls.upstream_fingerprint": "abc"}, "tls.upstream_fingerprint: expected a SHA-256"),
        ({"upstream_rules": [{"action": "allow"}]}, "upstream_rules[1]: a rule needs"),
        ({"upstream_rules": [{"action": "maybe", "cidr": "1.0.0.0/8"}]}, "upstream_rules[1]:"),
        ({"proxy_auth": ["no such:x"]}, "proxy_auth: 'no such:x' is not a checker"),
        ({"commands.deny": ["ST OR"]}, "commands.deny: 'ST OR' is not an FTP command name"),
        ({"limits.max_line": 10}, "limits.max_line: expected a whole number"),
        ({"data.relay": "zerocopy"}, "data.relay: expected one of auto, splice, copy"),
        ({"limits.max_open_files": -1}, "limits.max_open_files: expected a whole number"),
        ({"listen": ["unix:/run/ftp.sock"]}, "listen: 'unix:/run/ftp.sock': FTP needs an IP"),
        (
            {"listen": ["haproxy:ssl:990"]},
            "listen: 'haproxy:ssl:990': the PROXY protocol needs a TCP",
        ),
        ({"transparent": True, "upstream": "ftp.example"}, "transparent: the upstream comes"),
        (
            {
                "transparent": True,
                "data.passive_ports": "30000-30999",
                "proxy_auth": ["memory:a:b"],
            },
            "proxy_auth: proxy authentication",
        ),
        ({"transparent": True}, "transparent: needs data.passive_ports"),
        ({"data.masquerade_except": ["10.0.0.0/33"]}, "data.masquerade_except: '10.0.0.0/33'"),
    ],
)
def test_invalid_values_name_the_setting(layer: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        build(layer)
    assert str(error.value).startswith(message.split(":")[0] + ":")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_later_layers_win_and_rules_keep_their_order() -> None:
    config = build(
        {"upstream": "ftp.example.net:2121", "timeouts.idle": 5},
        {
            "timeouts.idle": "7",
            "allow_upstream": ["10.0.0.0/8"],
            "deny_upstream": ["10.1.0.0/16"],
            "upstream_rules": [{"action": "deny", "host": "*.bad.example"}],
        },
    )
    assert config.upstream == ("ftp.example.net", 2121)
    assert config.timeouts.idle == 7
    assert [rule.action for rule in config.upstream_policy_rules] == ["deny", "deny", "allow"]
    assert config.upstream_policy_rules[0] == Rule("deny", None, "*.bad.example", None)


def test_bad_toml_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = [\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_file(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_file(tmp_path / "missing.toml")


def test_shipped_examples_load_and_the_egress_policy_is_safe() -> None:
    from gateway.policy import UpstreamPolicy

    examples = SHIPPED.parent / "examples"
    configs = {path.stem: build(load_file(path)) for path in examples.glob("*.toml")}
    assert set(configs) == {"nat-edge", "egress-proxy"}
    assert configs["nat-edge"].data.passive_ports == (30000, 30999)
    policy = UpstreamPolicy(rules=configs["egress-proxy"].upstream_policy_rules)
    assert policy.check("8.8.8.8", 21, "ftp.example.net").allowed
    assert not policy.check("8.8.8.8", 22, "ftp.example.net").allowed
    assert not policy.check("10.0.0.1", 21, "files").allowed
    assert not policy.check("8.8.8.8", 21, "ftp.internal.example").allowed


def test_masquerade_except_takes_networks() -> None:
    config = build({"data.masquerade_except": ["10.0.0.0/8", "fd00::/8", "192.168.1.7"]})
    assert [str(n) for n in config.data.masquerade_except] == [
        "10.0.0.0/8",
        "fd00::/8",
        "192.168.1.7/32",
    ]


BACKENDS = [
    {"address": "127.0.0.1:2101", "name": "one", "weight": 3},
    {"address": "[::1]:2102", "group": "east", "tls_upstream": "off"},
]


def test_backends_and_routes() -> None:
    config = build(
        {
            "backends": BACKENDS,
            "balance": "user_hash",
            "routes": [{"user": "*@east", "backend_group": "east", "upstream_user": "{local}"}],
        }
    )
    one, two = config.backends
    assert (one.name, one.host, one.port, one.weight) == ("one", "127.0.0.1", 2101, 3)
    assert (two.name, two.group, two.tls_upstream) == ("[::1]:2102", "east", "off")
    assert config.reverse and not config.forward and config.connect_after_user
    assert config.pool_backends == config.backends


def test_upstream_is_a_pool_of_one() -> None:
    config = build({"upstream": "ftp.example.net"})
    assert [(b.name, b.host, b.port) for b in config.pool_backends] == [
        ("ftp.example.net:21", "ftp.example.net", 21)
    ]
    assert config.reverse and not config.connect_after_user
    assert build({}).pool_backends == ()


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ({"backends": [{"name": "x"}]}, 'backends[1]: a backend needs address = "host:port"'),
        ({"backends": [{"address": "h", "port": 21}]}, "backends[1]: unknown key 'port'"),
        ({"backends": [{"address": "h", "weight": 0}]}, "backends[1].weight: expected a whole"),
        ({"backends": [{"address": "h", "tls_upstream": "maybe"}]}, "backends[1].tls_upstream:"),
        ({"backends": [{"address": "[::1"}]}, "backends[1].address:"),
        ({"backends": [{"address": "h"}, {"address": "h:21"}]}, "backends: two backends"),
        ({"backends": {"address": "h"}}, "backends: expected an array of tables"),
        ({"backends": BACKENDS, "upstream": "h"}, "backends: upstream is the one-backend"),
        ({"balance": "random"}, "balance: expected one of round_robin"),
        ({"health.fall": 0}, "health.fall: expected a whole number"),
        ({"health.interval": 0}, "health.interval: expected a number"),
        ({"routes": [{"user": "a", "backend": "one"}]}, "routes: routes apply in reverse mode"),
        (
            {"backends": BACKENDS, "routes": [{"user": "a", "backend": "two"}]},
            "routes: route for 'a' names backend 'two', which is not among",
        ),
        (
            {"backends": BACKENDS, "routes": [{"user": "a", "backend_group": "west"}]},
            "routes: route for 'a' names backend_group 'west', which no backend has",
        ),
        (
            {
                "backends": BACKENDS,
                "routes": [
                    {
                        "user": "a",
                        "backend": "one",
                        "upstream_user": "b",
                        "upstream_password": "c",
                    }
                ],
            },
            "routes: route for 'a' carries an upstream password, which needs proxy_auth",
        ),
        (
            {"backends": BACKENDS, "proxy_auth": ["memory:a:b"]},
            "proxy_auth: proxy authentication applies to forward mode, or reverse mode with",
        ),
        ({"routes": [{"user": "a"}]}, "routes[1]: a route needs backend"),
        ({"routes_file": "/nonexistent/routes.csv"}, "routes_file: /nonexistent/routes.csv: "),
    ],
)
def test_invalid_backends_and_routes(layer: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        build(layer)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_routes_file_comes_after_inline_routes(tmp_path: Path) -> None:
    path = tmp_path / "routes.csv"
    path.write_text("user,backend\n*,one\n")
    config = build(
        {
            "backends": BACKENDS,
            "routes": [{"user": "a", "backend_group": "east"}],
            "routes_file": str(path),
        }
    )
    assert [route.user for route in config.routes] == ["a", "*"]
    assert config.routes_file == str(path)


def test_proxy_auth_with_routes_in_reverse_mode() -> None:
    config = build(
        {
            "backends": BACKENDS,
            "proxy_auth": ["memory:a:b"],
            "routes": [{"user": "*", "backend": "one"}],
        }
    )
    assert config.connect_after_user


def test_inline_route_passwords_need_a_file_others_cannot_read(tmp_path: Path) -> None:
    """[[routes]] with an upstream_password in the configuration file itself are held to the
    rule of routes_file: a file others may read or write stops start-up (and reloads)."""
    path = tmp_path / "gateway.toml"
    path.write_text(
        'proxy_auth = ["memory:alice:pw"]\nupstream = "127.0.0.1:2100"\n'
        '[[routes]]\nuser = "alice"\nbackend = "127.0.0.1:2100"\n'
        'upstream_user = "svc"\nupstream_password = "inline-secret"\n'
    )
    path.chmod(0o644)
    with pytest.raises(ConfigError) as refused:
        load_file(path)
    assert str(refused.value) == (
        f"routes: {path}: holds upstream passwords but others may read it (mode 0644); "
        "chmod o-rwx it"
    )
    assert "inline-secret" not in str(refused.value)
    path.chmod(0o640)
    assert build(load_file(path)).routes[0].upstream_password == "inline-secret"
    without = tmp_path / "open.toml"
    without.write_text('upstream = "127.0.0.1:2100"\n[[routes]]\nuser = "*"\nbackend = "b"\n')
    without.chmod(0o644)
    assert load_file(without)["routes"] == [{"user": "*", "backend": "b"}]
