"""The spliced relay's pipe: as large as helps, without starving other transfers of pipes.

Real pipes from the kernel, no sockets: `_pipe()` is what every spliced transfer starts with.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway import splice

MIB = 1024 * 1024


def _max_size() -> int:
    return int(Path("/proc/sys/fs/pipe-max-size").read_text())


def test_a_spliced_transfer_gets_a_pipe_of_1_mib_and_gives_it_back() -> None:
    """Fewer wake-ups per byte: the pipe is enlarged to 1 MiB (or pipe-max-size if lower),
    and the process's count of enlarged pipes returns to where it was when the pipe closes."""
    before = splice._enlarged
    pipe = splice._pipe()
    assert pipe is not None
    read_end, write_end, size = pipe
    try:
        assert size == min(MIB, _max_size())
        assert splice._enlarged == before + size
    finally:
        splice._close_pipe(read_end, write_end, size)
    assert splice._enlarged == before
    with pytest.raises(OSError):
        os.fstat(read_end)


def test_past_half_the_users_pipe_budget_an_unprivileged_gateway_keeps_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past pipe-user-pages-soft the kernel gives new pipes two pages: large pipes stop at
    half the budget, so later transfers still get the kernel's default 64 KiB."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(splice, "_enlarged", splice._PIPE_BUDGET - splice._PIPE_WANTED + 1)
    pipe = splice._pipe()
    assert pipe is not None
    read_end, write_end, size = pipe
    try:
        assert size == 64 * 1024
        assert splice._enlarged == splice._PIPE_BUDGET - splice._PIPE_WANTED + 1
    finally:
        splice._close_pipe(read_end, write_end, size)


def test_within_the_budget_an_unprivileged_gateway_enlarges_its_pipes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The budget only stops enlarging once it would be exceeded."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(splice, "_enlarged", splice._PIPE_BUDGET - splice._PIPE_WANTED)
    pipe = splice._pipe()
    assert pipe is not None
    read_end, write_end, size = pipe
    try:
        assert size == splice._PIPE_WANTED
    finally:
        splice._close_pipe(read_end, write_end, size)
