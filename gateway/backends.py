"""Reverse mode's backends: the pool, their health state and the balancing policies. Pure.

A reverse-mode gateway serves several backends (`[[backends]]`, or the one `upstream`). For each
session the shell asks the `Pool` which backend to try (`choose`), reports a backend that did
not connect or greet (`failed`), and counts sessions (`acquire`, `release`). The health-check
service reports each periodic check (`checked`). State changes come back as `Change` values for
the shell to log; metrics follow from those log events.

Policies (the `balance` setting):

- `round_robin`: smooth weighted round robin (as nginx does it): over any run of sessions each
  backend gets its weight's share, interleaved rather than in bursts.
- `least_connections`: the fewest sessions per unit of weight; ties go to the backend chosen
  least often, then to the first listed.
- `source_hash`, `user_hash`: weighted rendezvous hashing (highest random weight) of the client
  address or the login name. A key keeps its backend while that backend is up; when a backend
  goes down only its own keys move, and they come back when it returns.

A backend is out once health checks failed `fall` times in a row, or at once when a session
could not connect to it or was not greeted with 220; it is back in after `rise` successful
checks in a row, or at once when a session was served there. When every candidate is out,
the marks may be stale (a network blip seen by all checks at once), so each is still tried in
policy order before the client is refused.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

BALANCE_POLICIES = ("round_robin", "least_connections", "source_hash", "user_hash")
#: Policies that need the login name: the gateway greets by itself and connects after USER.
USER_POLICIES = frozenset({"user_hash"})


@dataclass(frozen=True, slots=True)
class Backend:
    """One backend server. TLS fields left None take the `[tls]` upstream settings."""

    name: str
    host: str
    port: int
    weight: int = 1
    group: str | None = None
    tls_upstream: str | None = None
    tls_upstream_ca_file: str | None = None
    tls_upstream_fingerprint: str | None = None
    tls_upstream_name: str | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Change:
    """A backend went down or came back up; `reason` says why (for the log line)."""

    backend: Backend
    up: bool
    reason: str


@dataclass(slots=True)
class _State:
    up: bool = True
    failures: int = 0  # consecutive failed checks while up
    successes: int = 0  # consecutive good checks while down
    sessions: int = 0
    chosen: int = 0
    current: int = 0  # smooth weighted round robin's running weight


@dataclass(slots=True)
class Pool:
    """The backends of a reverse-mode gateway and what is known about them."""

    backends: tuple[Backend, ...]
    balance: str = "round_robin"
    fall: int = 3
    rise: int = 2
    _state: dict[str, _State] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.balance not in BALANCE_POLICIES:
            raise ValueError(f"unknown balance policy {self.balance!r}")
        names = [backend.name for backend in self.backends]
        if len(set(names)) != len(names):
            raise ValueError("backend names must be unique")
        for name in names:
            self._state.setdefault(name, _State())

    def renewed(self, backends: Iterable[Backend], balance: str, fall: int, rise: int) -> Pool:
        """The pool after a reload: backends kept under the same name and address keep their
        health and session counts, so a reload neither revives a dead backend nor forgets
        sessions still running on it."""
        backends = tuple(backends)
        pool = Pool(backends, balance, fall, rise)
        old = {backend.name: backend for backend in self.backends}
        for backend in backends:
            previous = old.get(backend.name)
            if previous is not None and previous.address == backend.address:
                state = self._state[backend.name]
                state.current = 0
                pool._state[backend.name] = state
        return pool

    @property
    def needs_user(self) -> bool:
        return self.balance in USER_POLICIES

    def get(self, name: str) -> Backend | None:
        for backend in self.backends:
            if backend.name == name:
                return backend
        return None

    def is_up(self, name: str) -> bool:
        return self._state[name].up

    def sessions(self, name: str) -> int:
        return self._state[name].sessions

    def candidates(self, *, names: frozenset[str] | None = None) -> tuple[Backend, ...]:
        """The backends a session may use: all, or those named (a route's backend or group)."""
        if names is None:
            return self.backends
        return tuple(backend for backend in self.backends if backend.name in names)

    def choose(
        self,
        *,
        client: str,
        user: str | None = None,
        names: frozenset[str] | None = None,
        exclude: frozenset[str] = frozenset(),
    ) -> Backend | None:
        """The backend to try next for a session from `client` (its IP address) logging in as
        `user`, among `names` (None: all), skipping those already tried (`exclude`); None
        when nothing is left to try."""
        left = [b for b in self.candidates(names=names) if b.name not in exclude]
        up = [b for b in left if self._state[b.name].up]
        pool = up or left
        if not pool:
            return None
        if self.balance == "round_robin":
            chosen = self._round_robin(pool)
        elif self.balance == "least_connections":
            chosen = self._least_connections(pool)
        else:
            key = client if self.balance == "source_hash" else (user or "")
            chosen = max(pool, key=lambda backend: _rendezvous(key, backend))
        self._state[chosen.name].chosen += 1
        return chosen

    def _round_robin(self, pool: list[Backend]) -> Backend:
        total = sum(backend.weight for backend in pool)
        for backend in pool:
            self._state[backend.name].current += backend.weight
        chosen = max(pool, key=lambda backend: self._state[backend.name].current)
        self._state[chosen.name].current -= total
        return chosen

    def _least_connections(self, pool: list[Backend]) -> Backend:
        def load(backend: Backend) -> tuple[float, int]:
            state = self._state[backend.name]
            return state.sessions / backend.weight, state.chosen

        return min(pool, key=load)

    def acquire(self, name: str) -> None:
        """A session uses backend `name` from now on."""
        self._state[name].sessions += 1

    def release(self, name: str) -> None:
        """A session on backend `name` ended (or its attempt failed)."""
        state = self._state.get(name)
        if state is not None and state.sessions > 0:
            state.sessions -= 1

    def failed(self, name: str, reason: str) -> Change | None:
        """A session could not connect to backend `name` or was not greeted with 220: it is
        out at once, so the next sessions do not wait for it too."""
        state = self._state.get(name)
        if state is None:
            return None
        state.failures += 1
        state.successes = 0
        if not state.up:
            return None
        state.up = False
        return Change(self._backend(name), up=False, reason=reason)

    def served(self, name: str) -> Change | None:
        """A session connected to backend `name` and was greeted with 220. One that was
        marked down is back at once: it was tried because every candidate was down, and it
        just proved itself (this is also how the unchecked `upstream` shorthand comes back)."""
        state = self._state.get(name)
        if state is None or state.up:
            return None
        state.up = True
        state.failures = state.successes = 0
        return Change(self._backend(name), up=True, reason="a session was served")

    def checked(self, name: str, ok: bool, reason: str = "") -> Change | None:
        """A health check of backend `name` ended: ok (greeted with 220 in time) or not."""
        state = self._state.get(name)
        if state is None:
            return None  # removed by a reload while the check ran
        if ok:
            state.failures = 0
            if state.up:
                return None
            state.successes += 1
            if state.successes < self.rise:
                return None
            state.up = True
            state.successes = 0
            return Change(self._backend(name), up=True, reason=_checks(self.rise, "passed"))
        state.successes = 0
        if not state.up:
            return None
        state.failures += 1
        if state.failures < self.fall:
            return None
        state.up = False
        return Change(
            self._backend(name), up=False, reason=f"{_checks(self.fall, 'failed')}: {reason}"
        )

    def _backend(self, name: str) -> Backend:
        backend = self.get(name)
        assert backend is not None
        return backend


def backend_groups(backends: Iterable[Backend]) -> dict[str, frozenset[str]]:
    """Backend group name to the names of the backends in it (`group = "..."`)."""
    groups: dict[str, set[str]] = {}
    for backend in backends:
        if backend.group is not None:
            groups.setdefault(backend.group, set()).add(backend.name)
    return {group: frozenset(names) for group, names in groups.items()}


def _rendezvous(key: str, backend: Backend) -> float:
    """Weighted highest-random-weight score of `key` on `backend`: -weight / ln(u), u uniform
    in (0, 1) from a stable hash (not Python's per-process `hash`), so every gateway process
    and every reload maps a key the same way."""
    digest = hashlib.blake2b(
        f"{backend.name}\0{key}".encode("utf-8", "surrogateescape"), digest_size=8
    ).digest()
    u = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)
    return -backend.weight / math.log(u)


def _checks(count: int, outcome: str) -> str:
    """For the log line of a change: "1 check passed", "3 checks failed"."""
    return f"{count} check{'' if count == 1 else 's'} {outcome}"
