"""Start-up capacity rules: listen backlogs and the open files limit (pure, no sockets)."""

from __future__ import annotations

import pytest

from gateway.capacity import (
    DEFAULT_BACKLOG,
    backlog_for,
    open_files_target,
    sessions_supported,
    with_backlog,
)


@pytest.mark.parametrize(
    ("somaxconn", "expected"),
    [(None, DEFAULT_BACKLOG), (0, DEFAULT_BACKLOG), (128, 128), (4096, DEFAULT_BACKLOG)],
)
def test_default_backlog_is_capped_by_somaxconn(somaxconn: int | None, expected: int) -> None:
    assert backlog_for(somaxconn) == expected


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("tcp:2121", "tcp:2121:backlog=1024"),
        ("tcp:2121:interface=127.0.0.1", "tcp:2121:interface=127.0.0.1:backlog=1024"),
        ("tcp6:2121:interface=\\:\\:1", "tcp6:2121:interface=\\:\\:1:backlog=1024"),
        ("TCP:21", "TCP:21:backlog=1024"),
        ("haproxy:tcp:2121", "haproxy:tcp:2121:backlog=1024"),
        ("haproxy:tcp:2121:backlog=8", "haproxy:tcp:2121:backlog=8"),
        ("ssl:990:privateKey=k.pem", "ssl:990:privateKey=k.pem:backlog=1024"),
        # The operator's own figure wins.
        ("tcp:2121:backlog=10", "tcp:2121:backlog=10"),
        ("tcp:port=21:backlog=4000:interface=::", "tcp:port=21:backlog=4000:interface=::"),
        # Endpoints that take no backlog are left alone.
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
        ("tcp", "tcp"),
    ],
)
def test_backlog_added_only_where_the_endpoint_sets_none(endpoint: str, expected: str) -> None:
    assert with_backlog(endpoint, 1024) == expected


@pytest.mark.parametrize(
    ("soft", "hard", "wanted", "expected"),
    [
        (1024, 524288, 0, 524288),  # raise to the hard limit
        (1024, 524288, 65536, 65536),  # or to the configured figure
        (1024, 4096, 65536, 4096),  # never above the hard limit
        (1024, 4096, 256, 256),  # a configured figure is honoured even if lower
        (1024, -1, 0, 1024),  # unlimited hard limit: keep the soft one
        (1024, -1, 100000, 100000),
    ],
)
def test_open_files_target(soft: int, hard: int, wanted: int, expected: int) -> None:
    assert open_files_target(soft, hard, wanted) == expected


def test_sessions_supported_counts_four_descriptors_each() -> None:
    assert sessions_supported(1024) == 240
    assert sessions_supported(4064) == 1000
    assert sessions_supported(10) == 0
    assert sessions_supported(-1) > 10**6
