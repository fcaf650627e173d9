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
