"""Settings declared once: `Config` mirrors the TOML file, and the command line, the shipped
configuration file and the README are checked against (or built from) that one declaration."""

from __future__ import annotations

import re
from operator import attrgetter
from pathlib import Path

import pytest

from gateway.codec import DEFAULT_MAX_LINE
from gateway.config import SETTINGS, Config, Setting, build, load_file
from gateway.tap import Options

PROJECT = Path(__file__).resolve().parent.parent


class _Parsed(Options):
    """The gateway's options without the configuration check that follows parsing."""

    def postOptions(self) -> None:
        pass


def parsed(*args: str) -> _Parsed:
    options = _Parsed()
    options.parseOptions(list(args))
    return options


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda setting: setting.key)
def test_each_settings_toml_key_is_its_attribute_path(setting: Setting) -> None:
    """`[tls] client` is `config.tls.client`: the key, read as a path, finds the default."""
    assert attrgetter(setting.key)(Config()) == setting.default
    assert attrgetter(setting.key)(build({})) == setting.default


def test_every_setting_says_what_it_does() -> None:
    for setting in SETTINGS:
        assert setting.help.strip() and setting.help.endswith("."), setting.key
        assert callable(setting.parse), setting.key
    assert len({setting.key for setting in SETTINGS}) == len(SETTINGS)


def test_the_default_command_line_length_is_the_codecs() -> None:
    assert Config().limits.max_line == DEFAULT_MAX_LINE
    assert build(load_file(PROJECT / "etc" / "ftp-gateway.toml")).limits.max_line == (
        DEFAULT_MAX_LINE
    )


def test_the_command_lines_setting_options_are_the_declared_ones() -> None:
    options = _Parsed()
    declared = {setting.option for setting in SETTINGS if setting.option}
    long_names = {name for name, *_ in options.optParameters} | {
        name for name, *_ in options.optFlags
    }
    handlers = {name[4:].replace("_", "-") for name in dir(options) if name.startswith("opt_")}
    assert declared <= long_names | handlers
    own = {"config", "demo", "check-config", "version", "help"}
    assert (long_names | handlers) - declared - own == set()


def test_options_set_the_settings_they_are_declared_for() -> None:
    options = parsed(
        "--listen",
        "tcp:2121",
        "--listen",
        "tcp6:2121",
        "-u",
        "ftp.example.net:2121",
        "--allow-upstream",
        "10.0.0.0/8",
        "--deny-upstream",
        "10.1.0.0/16",
        "--upstream-data-mode",
        "epsv",
        "--passive-ports",
        "30000-30010",
        "--masquerade-address",
        "203.0.113.7",
        "--source-address",
        "192.0.2.4",
    )
    overrides = options.overrides()
    assert overrides == {
        "listen": ["tcp:2121", "tcp6:2121"],
        "upstream": "ftp.example.net:2121",
        "allow_upstream": ["10.0.0.0/8"],
        "deny_upstream": ["10.1.0.0/16"],
        "data.upstream_mode": "epsv",
        "data.passive_ports": "30000-30010",
        "data.masquerade_address": "203.0.113.7",
        "data.source_address": "192.0.2.4",
    }
    config = build(overrides)
    assert config.data.upstream_mode == "epsv"
    assert config.data.passive_ports == (30000, 30010)
    assert [rule.action for rule in config.upstream_policy_rules] == ["deny", "allow"]
    assert parsed("--transparent").overrides() == {"transparent": True}
    assert parsed().overrides() == {}


def test_each_options_help_is_its_settings_help() -> None:
    options = _Parsed()
    usage = str(options)
    for setting in SETTINGS:
        if setting.option:
            assert f"--{setting.option}" in usage
            assert setting.help in options.docs[setting.option], setting.key
            assert setting.key in options.docs[setting.option], setting.key


def test_the_readme_lists_every_option() -> None:
    readme = (PROJECT / "README.md").read_text()
    listed = set(re.findall(r"`--([a-z-]+)", readme))
    for setting in SETTINGS:
        if setting.option:
            assert setting.option in listed, setting.option
