"""Fixtures shared by the test files.

- `pki`: a throwaway CA with good and deliberately bad server certificates (one per run).
- `payload`: several megabytes of random bytes, the size a multiple of no buffer size.
- `server`: a pyftpdlib server for a module's tests, serving the module's `SERVED` files
  (a dict of name to bytes, each world-readable), started with its `SERVER_OPTIONS`.
- `gateways` / `module_gateways`: start real gateway processes (`start(*args, config=TOML)`),
  all stopped when the test (or the module) ends.

The end-to-end files that move plain TCP data carry the `data_path` marker: the README's test
command runs the whole suite on the default relay (spliced on Linux), then
`FTP_GATEWAY_TEST_RELAY=copy python -m pytest -m data_path` runs them again on the copy relay.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from gateway_process import GatewayProcess, StartGateway, start_gateway
from pki import Pki, make_pki
from servers import RunningServer, start_server

#: Test files whose gateways move plain TCP data, so they run once per data relay.
DATA_PATH_MODULES = frozenset(
    {
        "test_core_e2e",
        "test_transfers_e2e",
        "test_performance_e2e",
        "test_policy_e2e",
        "test_ops_e2e",
        "test_hostile",
        "test_hostile_memory",
        "test_hostile_replies",
        "test_policy_hostile",
        "test_matrix",
        "test_reload",
        "test_metrics",
        "test_transparent",
        "test_shutdown",
        "test_logs",
        "test_haproxy_e2e",
        "test_backends_e2e",
        "test_routes_e2e",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in DATA_PATH_MODULES:
            item.add_marker(pytest.mark.data_path)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def payload() -> bytes:
    return os.urandom(4 * 1024 * 1024 + 12345)


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    served: dict[str, bytes] = getattr(request.module, "SERVED", {})
    options: dict[str, Any] = getattr(request.module, "SERVER_OPTIONS", {})
    directory = tmp_path_factory.mktemp("pyftpdlib")
    with start_server("pyftpdlib", directory, **options) as running:
        for name, data in served.items():
            (running.root / name).write_bytes(data)
            (running.root / name).chmod(0o644)
        yield running


@contextmanager
def _gateways(workdir: Callable[[], Path]) -> Iterator[StartGateway]:
    with ExitStack() as stack:

        def start(*args: str, config: str | None = None, host: str = "127.0.0.1") -> GatewayProcess:
            directory = workdir()
            if config is not None:
                path = directory / "gateway.toml"
                path.write_text(config)
                args = ("--config", str(path), *args)
            return stack.enter_context(start_gateway(directory, *args, host=host))

        yield start


@pytest.fixture
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartGateway]:
    with _gateways(lambda: tmp_path_factory.mktemp("gateway")) as start:
        yield start


@pytest.fixture(scope="module")
def module_gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartGateway]:
    with _gateways(lambda: tmp_path_factory.mktemp("gateway")) as start:
        yield start
