"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest
from pki import Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA with good and deliberately bad server certificates."""
    return make_pki(tmp_path_factory.mktemp("pki"))
